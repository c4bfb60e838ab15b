"""`deltacli merge --method`: TIES and DARE over deltas of any linear kind, against mergekit,
PEFT and a reference written from the papers' definitions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge import saved_delta

from deltacli.build import prepare_model
from deltacli.commands.merge import merge
from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import read_delta, save_delta

LORA = [{"kind": "lora", "r": 4, "alpha": 8}]


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def dense_increments(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """Each base tensor's ΔW from a saved delta: what a one-delta merge changes."""
    merged = folder.parent / f"{folder.name}-alone"
    merge(str(base), [folder], merged)
    before, after = weights_of(base), weights_of(merged)
    return {
        k: after[k] - before[k]
        for k in after
        if k in before and not torch.equal(after[k], before[k])
    }


def ties_reference(taus: list[torch.Tensor], weights: list[float], density: float):
    """TIES from the paper, mergekit's way: keep the top `density` share of each τ by
    magnitude, elect the sign of the weighted sum, average the agreeing weighted entries."""
    trimmed = []
    for tau in taus:
        keep = max(1, int(density * tau.numel()))
        mask = torch.zeros(tau.numel(), dtype=tau.dtype)
        mask[torch.argsort(tau.abs().reshape(-1), descending=True)[:keep]] = 1
        trimmed.append(tau * mask.view_as(tau))
    weighted = torch.stack([w * t for w, t in zip(weights, trimmed, strict=True)])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = weighted.sign() == sign
    w = torch.tensor(weights, dtype=weighted.dtype).view(-1, *[1] * (weighted.ndim - 1))
    divisor = (w * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def test_ties_of_mixed_kinds_is_ties_of_their_dense_increments(tiny_bert, tmp_path):
    """A LoRA, an IA3 and a SIFT-free `modules` delta combine by TIES on their ΔW: the
    merged weights are the base plus TIES of each delta's own increment."""
    deltas = {
        "lora": LORA,
        "ia3": [{"kind": "ia3"}],
        "modules": [{"kind": "modules", "targets": ["attention.self.query"]}],
    }
    folders = []
    for seed, (name, spec) in enumerate(deltas.items()):
        folders.append(tmp_path / name)
        saved_delta(tiny_bert, folders[-1], spec, seed=seed)
    weights = [0.5, 1.0, 0.8]
    out = tmp_path / "ties"
    merge(str(tiny_bert), folders, out, weights=weights, method="ties", densities=[0.4])
    base, merged = weights_of(tiny_bert), weights_of(out)
    increments = [dense_increments(tiny_bert, f) for f in folders]
    for name in set().union(*increments):
        taus = [inc.get(name, torch.zeros_like(base.get(name, merged[name]))) for inc in increments]
        present = [
            (w, t) for w, t, inc in zip(weights, taus, increments, strict=True) if name in inc
        ]
        expected = ties_reference([t for _, t in present], [w for w, _ in present], 0.4)
        start = base.get(name, torch.zeros_like(merged[name]))
        torch.testing.assert_close(merged[name], start + expected, rtol=0, atol=1e-6)


def test_dare_with_density_one_is_the_plain_sum(tiny_bert, tmp_path):
    for seed, name in enumerate(("a", "b")):
        saved_delta(tiny_bert, tmp_path / name, LORA, seed=seed)
    folders = [tmp_path / "a", tmp_path / "b"]
    merge(str(tiny_bert), folders, tmp_path / "sum", weights=[0.6, 0.4], method="task_arithmetic")
    for method in ("dare_linear", "dare_ties"):
        merge(str(tiny_bert), folders, tmp_path / method, weights=[0.6, 0.4], method=method,
              densities=[1.0])  # fmt: skip
    plain, linear = weights_of(tmp_path / "sum"), weights_of(tmp_path / "dare_linear")
    assert all(torch.equal(plain[k], linear[k]) for k in plain)
    # dare_ties at density 1 is TIES without trimming or averaging: it differs only where signs disagree
    assert weights_of(tmp_path / "dare_ties").keys() == plain.keys()


def test_dare_drops_a_seeded_share_and_rescales(tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "a", LORA)
    increments = dense_increments(tiny_bert, tmp_path / "a")
    runs = {}
    for name, seed in (("one", 1), ("again", 1), ("other", 2)):
        merge(str(tiny_bert), [tmp_path / "a"], tmp_path / name, method="dare_linear",
              densities=[0.3], seed=seed)  # fmt: skip
        runs[name] = weights_of(tmp_path / name)
    base = weights_of(tiny_bert)
    name = next(iter(k for k in increments if k.endswith("query.weight")))
    kept = runs["one"][name] - base[name]
    share = float((kept != 0).double().mean())
    assert 0.2 < share < 0.4
    nonzero = kept != 0
    torch.testing.assert_close(kept[nonzero], increments[name][nonzero] / 0.3, rtol=1e-5, atol=1e-7)
    assert torch.equal(runs["one"][name], runs["again"][name])
    assert not torch.equal(runs["one"][name], runs["other"][name])


def test_two_loras_ties_equals_peft_ties_svd_at_full_rank(tiny_llama, tmp_path):
    """PEFT's `add_weighted_adapter(combination_type="ties_svd")` applies TIES to the dense
    increments and factors the result back at `svd_rank`: at full rank it is deltacli's TIES
    (weights 1: PEFT averages agreeing entries by count, mergekit and deltacli by weight).
    PEFT's plain `ties` combines A and B separately, which is not TIES on ΔW."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # q_proj only: full rank is the square 32 (v_proj's 16 outputs would cap PEFT's rank).
    lora = [{**LORA[0], "targets": ["q_proj"]}]
    for seed, name in enumerate(("a", "b")):
        recipe = parse_recipe({"model": str(tiny_llama), "task": "causal-lm", "deltas": lora})
        _, attached = prepare_model(recipe)
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in attached.parameters().values():
                param.add_(torch.randn_like(param) * 0.3)
        (tmp_path / name).mkdir()
        save_delta(tmp_path / name, attached, recipe, str(tiny_llama), None)
    merge(str(tiny_llama), [tmp_path / "a", tmp_path / "b"], tmp_path / "ties", method="ties",
          densities=[0.5])  # fmt: skip
    ours = weights_of(tmp_path / "ties")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    model = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ties", combination_type="ties_svd",
                               density=0.5, svd_rank=32)  # fmt: skip
    model.set_adapter("ties")
    theirs = model.merge_and_unload(adapter_names=["ties"]).state_dict()
    compared = 0
    for name in ours:
        if name.endswith("q_proj.weight"):
            torch.testing.assert_close(ours[name], theirs[name].double(), rtol=0, atol=1e-5)
            compared += 1
    assert compared == 2


def test_bad_merge_requests_exit_2(cli, tiny_bert, tmp_path):
    saved_delta(tiny_bert, tmp_path / "a", LORA)
    cases = [
        (["--method", "ties", "--density", "1.5"], "--density must lie in (0, 1]"),
        (["--method", "ties", "--density", "0"], "--density must lie in (0, 1]"),
        (["--method", "median"], "--method must be one of"),
        (["--density", "0.5"], "--density needs --method"),
        (["--method", "ties", "--verify"], "drop --verify"),
    ]
    for options, message in cases:
        code, _, err = cli("merge", tiny_bert, tmp_path / "a", tmp_path / "out", *options)
        assert code == 2 and message in err, (options, err)
        assert len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_heads_for_other_labels_do_not_combine_but_the_bodies_do(cli, tiny_bert, tmp_path):
    """Two classifiers' deltas (2 and 3 labels): their heads cannot add up, so the merge is
    refused with one line and nothing written; the same LoRAs without heads merge."""
    saved_delta(tiny_bert, tmp_path / "two", LORA, seed=1)
    saved_delta(tiny_bert, tmp_path / "three", LORA, seed=2, labels=(0, 1, 2))
    code, _, err = cli("merge", tiny_bert, tmp_path / "two", tmp_path / "three",
                       tmp_path / "out", "--method", "ties")  # fmt: skip
    message = "changes classifier.weight of shape (3, 32)"
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    for name in ("two", "three"):
        saved_delta(tiny_bert, tmp_path / f"{name}-body", [{**LORA[0], "targets": ["query"]}],
                    labels=(0, 1) if name == "two" else (0, 1, 2))  # fmt: skip
        recipe = tmp_path / f"{name}-body" / "recipe.yaml"
        recipe.write_text(recipe.read_text().replace("head: true", "head: false"))
        tensors = load_file(tmp_path / f"{name}-body" / "adapter_model.safetensors")
        save_file({k: v for k, v in tensors.items() if "lora_" in k},
                  tmp_path / f"{name}-body" / "adapter_model.safetensors")  # fmt: skip
    code, _, err = cli("merge", tiny_bert, tmp_path / "two-body", tmp_path / "three-body",
                       tmp_path / "bodies", "--method", "ties", "--density", "0.5")  # fmt: skip
    assert code == 0, err


def _full_finetune(base: Path, folder: Path, seed: int) -> Path:
    """A `full` delta of random changes, and the tuned model it makes, saved."""
    recipe = parse_recipe({"model": str(base), "task": "causal-lm", "deltas": [{"kind": "full"}]})
    model, attached = prepare_model(recipe)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in attached.parameters().values():
            param.add_(torch.randn_like(param) * 0.05)
    folder.mkdir()
    save_delta(folder, attached, recipe, str(base), None)
    model.save_pretrained(folder.with_name(f"{folder.name}-model"))
    shutil.copy(base / "tokenizer.json", folder.with_name(f"{folder.name}-model"))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)) is None,
                    reason="mergekit is not installed")  # fmt: skip
def test_ties_of_two_full_finetunes_equals_mergekit(tiny_llama, tmp_path):
    a, b = (_full_finetune(tiny_llama, tmp_path / n, s) for n, s in (("a", 1), ("b", 2)))
    merge(str(tiny_llama), [a, b], tmp_path / "ours", weights=[0.7, 0.3], method="ties",
          densities=[0.5, 0.3])  # fmt: skip
    config = {
        "merge_method": "ties",
        "base_model": str(tiny_llama),
        "models": [
            {"model": str(tmp_path / "a-model"), "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": str(tmp_path / "b-model"), "parameters": {"weight": 0.3, "density": 0.3}},
        ],
        "dtype": "float32",
    }
    (tmp_path / "config.yml").write_text(json.dumps(config))
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    done = subprocess.run(
        [mergekit, str(tmp_path / "config.yml"), str(tmp_path / "theirs")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ours = weights_of(tmp_path / "ours")
    theirs = {}
    for file in (tmp_path / "theirs").glob("*.safetensors"):
        theirs |= {k: v.double() for k, v in load_file(file).items()}
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6)
    assert read_delta(a).recipe.deltas[0].kind == "full"


def test_a_combination_written_as_a_delta_merges_to_the_combined_model(cli, tiny_bert, tmp_path):
    """`--as-delta` writes the TIES combination as a `modules` delta (every changed tensor),
    or with `--rank` as a LoRA: either, merged onto the base, is the TIES-merged model (the
    LoRA at full rank)."""
    for seed, name in enumerate(("a", "b")):
        saved_delta(tiny_bert, tmp_path / name, LORA, seed=seed)
    inputs = [tiny_bert, tmp_path / "a", tmp_path / "b"]
    ties = ["--method", "ties", "--density", "0.5"]
    assert cli("merge", *inputs, tmp_path / "model", *ties)[0] == 0
    code, _, err = cli("merge", *inputs, tmp_path / "dense", *ties, "--as-delta")
    assert code == 0, err
    code, _, err = cli("merge", *inputs, tmp_path / "lora", *ties, "--as-delta", "--rank", "64")
    assert code == 0, err
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 64
    expected = weights_of(tmp_path / "model")
    for delta in ("dense", "lora"):
        merge(str(tiny_bert), [tmp_path / delta], tmp_path / f"{delta}-merged")
        merged = weights_of(tmp_path / f"{delta}-merged")
        for name, tensor in expected.items():
            torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-5)
    code, _, err = cli("merge", *inputs, tmp_path / "bad", "--rank", "4")
    assert code == 2 and "--rank needs --as-delta" in err
