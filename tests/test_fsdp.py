"""A delta sharded by FSDP is saved whole: every process gathers its shards, the main process
writes, and the file holds the trained values (PEFT's known failure under ZeRO-3 / FSDP is an
adapter saved empty or as initialised).

accelerate runs FSDP only on accelerators (on CPUs it falls back to DDP, checked); torch runs
FSDP2 on CPUs with gloo. So two processes shard the model with torch's `fully_shard`, as
accelerate does on GPUs, and deltacli's own gathering is what is tested.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltacli.build import prepare_model
from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import WEIGHTS_FILE
from helpers import assert_close, free_port, run_offline, what_failed

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))

SHARDED = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from deltacli.build import prepare_model
from deltacli.recipe import parse_recipe
from deltacli.storage.delta_folder import save_delta

dist.init_process_group("gloo")
recipe = parse_recipe(json.loads(sys.argv[1]))
torch.manual_seed(0)  # every process starts from the same initial delta (as set_seed does)
model, deltas = prepare_model(recipe)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
deltas.follow_sharded(model)
assert all(isinstance(p, DTensor) for p in deltas.parameters().values())
steps(model, deltas)
import pathlib
folder = pathlib.Path(sys.argv[2]) if dist.get_rank() == 0 else None
if folder:
    folder.mkdir()
save_delta(folder, deltas, recipe, recipe.model, None)
dist.destroy_process_group()
"""


def steps(model, deltas):
    """Three AdamW steps on one fixed batch (every process sees the same one)."""
    optimizer = torch.optim.AdamW(list(deltas.parameters().values()), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (2, 9), generator=generator)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
@pytest.mark.parametrize(
    "delta", [{"kind": "lora", "r": 4}, {"kind": "prefix", "length": 3, "projection": 8}]
)
def test_an_fsdp_sharded_delta_is_saved_whole_with_its_trained_values(tiny_llama, tmp_path, delta):
    raw = {"model": str(tiny_llama), "task": "causal-lm", "base_dtype": "fp64", "deltas": [delta]}
    script = tmp_path / "sharded.py"
    source = SHARED_STEPS + SHARDED
    script.write_text(source)
    done = run_offline(
        [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
         json.dumps(raw), str(tmp_path / "delta")],
        tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, what_failed(done)
    saved = load_file(tmp_path / "delta" / WEIGHTS_FILE)

    recipe = parse_recipe(raw)
    torch.manual_seed(0)
    model, deltas = prepare_model(recipe)
    initial = {k: v.clone() for k, v in deltas.export()[1].items()}
    steps(model, deltas)
    expected = deltas.export()[1]
    assert saved.keys() == expected.keys()
    for key, tensor in expected.items():
        assert_close(saved[key], tensor, rel=1e-9)
        assert saved[key].shape == tensor.shape  # whole, not one process's shard
    assert any(not torch.equal(expected[k], initial[k]) for k in expected)  # it trained


SHARED_STEPS = f"""
import torch
{__import__("inspect").getsource(steps)}
"""


# `deltacli train` under torchrun with its model sharded by torch's FSDP2, as accelerate's FSDP
# plugin shards it on GPUs (accelerate falls back to DDP on CPUs): `prepare` shards the
# decoder layers and the model and points the optimizer at the sharded parameters. With
# `kill STEP`, the process kills itself (SIGKILL) once the training log records STEP.
FSDP_TRAIN = """
import os, signal, sys
import accelerate
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from deltacli.cli import main
from deltacli.training import logs
from deltacli.training.trainer import Trainer

how, at = sys.argv.pop(1), int(sys.argv.pop(1))
prepare = accelerate.Accelerator.prepare

def sharding_prepare(self, model, *rest):
    names = {id(p): n for n, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for n, p in sharded.items() if "lora_" in n)
    optimizer = rest[0]
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return (model, *prepare(self, *rest))

accelerate.Accelerator.prepare = sharding_prepare
Trainer.sharded = property(lambda self: True)
write = logs.MetricsLog.write

def write_then_kill(self, **record):
    write(self, **record)
    if how == "kill" and record.get("step") == at and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)

logs.MetricsLog.write = write_then_kill
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
def test_an_fsdp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_delta(
    tiny_llama, instructions, tmp_path
):
    """Two processes, the model sharded: kill -9 after the step-2 checkpoint, `--resume`,
    and the delta equals, bit for bit, the run that was never stopped."""
    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP_TRAIN)
    train = [
        "train", "--method", "lora", "--model", str(tiny_llama), "--data",
        str(instructions["train"]), "--eval-data", str(instructions["eval"]), "task=causal-lm",
        "base_dtype=fp64", "data.max_length=64", "train.max_steps=5", "train.batch_size=4",
        "train.save_every=2", "train.log_every=1", "train.lr=1e-2",
    ]  # fmt: skip

    def run(how: str, *arguments: str) -> subprocess.CompletedProcess:
        return run_offline(
            [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
             how, "3", *arguments],
            tmp_path, timeout=300, ACCELERATE_USE_CPU="1",
        )  # fmt: skip

    whole = run("none", *train, "-o", "whole")
    assert whole.returncode == 0, what_failed(whole)
    killed = run("kill", *train, "-o", "cut")
    assert killed.returncode != 0 and not (tmp_path / "cut").exists()
    resumed = run("none", "train", "--resume", "cut")
    assert resumed.returncode == 0, what_failed(resumed)
    assert "resumed from" in resumed.stderr and "step-000002" in resumed.stderr
    expected = load_file(tmp_path / "whole" / WEIGHTS_FILE)
    got = load_file(tmp_path / "cut" / WEIGHTS_FILE)
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
