"""`deltacli extract`: a LoRA from the SVD of a dense update — exact at full rank, the kept
norm share of a direct SVD at low rank, loadable by PEFT."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_merge import saved_delta
from transformers import AutoModelForSequenceClassification

from deltacli.commands.extract import extract
from deltacli.commands.merge import merge

FULL = [{"kind": "full"}]


def weights_of(folder):
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def test_full_rank_reproduces_the_dense_update_and_peft_loads_it(tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "full", FULL)
    report = extract(str(tiny_bert), str(tmp_path / "full"), tmp_path / "lora", rank=64)
    assert report.norm_kept > 1 - 1e-9
    merge(str(tiny_bert), [tmp_path / "full"], tmp_path / "dense")
    merge(str(tiny_bert), [tmp_path / "lora"], tmp_path / "low")
    dense, low = weights_of(tmp_path / "dense"), weights_of(tmp_path / "low")
    targeted = {f"{m.name}.weight" for m in report.matrices}
    assert targeted and all(name in dense for name in targeted)
    for name in targeted:
        torch.testing.assert_close(low[name], dense[name], rtol=0, atol=1e-5)
    # PEFT reads the folder as an ordinary LoRA (scaling 1) with the head as modules_to_save.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, dtype=torch.float64)
    peft = PeftModel.from_pretrained(base, tmp_path / "lora").merge_and_unload().state_dict()
    for name in targeted:
        torch.testing.assert_close(peft[name], low[name], rtol=0, atol=1e-5)


def test_low_rank_keeps_the_norm_share_of_a_direct_svd(tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "full", FULL)
    report = extract(str(tiny_bert), str(tmp_path / "full"), tmp_path / "lora", rank=4)
    merge(str(tiny_bert), [tmp_path / "full"], tmp_path / "dense")
    base, dense = weights_of(tiny_bert), weights_of(tmp_path / "dense")
    merge(str(tiny_bert), [tmp_path / "lora"], tmp_path / "low")
    low = weights_of(tmp_path / "low")
    for matrix in report.matrices:
        name = f"{matrix.name}.weight"
        update = dense[name] - base[name]
        singular = torch.linalg.svdvals(update)
        expected = float(singular[:4].square().sum().sqrt() / singular.square().sum().sqrt())
        assert matrix.kept == 4
        assert abs(matrix.norm_kept - expected) < 1e-6
        # Eckart-Young: the residual's norm is that of the dropped singular values.
        residual = float((low[name] - base[name] - update).norm())
        assert abs(residual - float(singular[4:].square().sum().sqrt())) < 1e-5
    assert 0 < report.norm_kept < 1


def test_extract_from_a_model_directory_on_the_command_line(cli, tiny_bert, tmp_path):
    model = saved_delta(tiny_bert, tmp_path / "full", FULL)
    model.save_pretrained(tmp_path / "tuned")
    code, out, err = cli(
        "extract", tiny_bert, tmp_path / "tuned", tmp_path / "lora", "--rank", "8", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["rank"] == 8 and report["matrices"]
    assert 0 < report["norm_kept"] < 1
    code, _, err = cli("extract", tiny_bert, tmp_path / "tuned", tmp_path / "zero", "--rank", "0")
    assert code == 2 and not (tmp_path / "zero").exists()
