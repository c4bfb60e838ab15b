"""deltacli's preference losses against TRL's, in float64 on a tiny Llama with LoRA.

DPO and IPO: TRL's DPOTrainer (a PEFT LoRA with the same weights, its reference the adapter
disabled) computes the loss of the same pairs; the loss and every LoRA gradient agree to
1e-8. TRL's fused LM head computes log-probabilities in float32 whatever the model's dtype,
so the 1e-8 comparison gives it a float64 log-softmax in its place (everything else is
TRL's: tokenisation, collation, the disabled adapter, the loss); with its own kernel the
agreement is float32's, 1e-6. SimPO and ORPO live in TRL's experimental CPO and ORPO trainers: their loss functions
applied to deltacli's log-probabilities give deltacli's loss and gradients.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from deltacli.tasks.preference import policy_logps
from deltacli.training.trainer import Trainer
from helpers import preference_rows, tiny_recipe, write_jsonl

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

PAIRS = 8
BETA = 0.3


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eight-pairs")
    path = write_jsonl(folder / "pairs.jsonl", preference_rows(PAIRS, seed=5))
    return {"train": path, "eval": path}


def _deltacli(tiny_llama, data, loss: str) -> tuple[Trainer, dict]:
    """A float64 LoRA preference trainer whose B matrices are not zero (the policy differs
    from the reference from the first step), and one batch of all the pairs."""
    recipe = tiny_recipe(
        tiny_llama, data, {"kind": "lora", "r": 4, "alpha": 8}, task="preference",
        base_dtype="fp64", batch_size=PAIRS, loss=loss, beta=BETA,
    )  # fmt: skip
    trainer = Trainer(recipe, None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.deltas.parameters().items():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))
    table = trainer.data.train
    batch = trainer.task.collate(trainer.tokenizer, table)([table[i] for i in range(PAIRS)])
    return trainer, batch


def _deltacli_loss_and_grads(trainer: Trainer, batch: dict) -> tuple[float, dict]:
    trainer.model.eval()  # no dropout on either side
    summed, _ = trainer.pairs(trainer.model, batch)
    loss = summed / PAIRS
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.deltas.parameters().items()}
    return float(loss), grads


class ExactLogProbs:
    """TRL's chunked log-probability function, in the inputs' dtype (float64 here)."""

    @staticmethod
    def apply(hidden, weight, bias, labels, temperature, chunk, softcap, scale, outputs):
        logits = hidden @ weight.T + (0 if bias is None else bias)
        logits = logits * (1.0 if scale is None else scale)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logps = (logits / temperature).log_softmax(-1)
        picked = logps.gather(-1, labels[:, None]).squeeze(-1)
        probs = logps.exp()
        return (
            picked,
            -(probs * logps).sum(-1).detach(),
            (probs**2).sum(-1).log().detach(),
            logits.mean(-1).detach(),
            logits.argmax(-1) == labels,
        )


@pytest.mark.parametrize("exact", [True, False], ids=["float64", "trl-kernel"])
@pytest.mark.parametrize(("loss", "trl_loss"), [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trl_dpo_trainer(
    tiny_llama, eight_pairs, tmp_path, monkeypatch, loss, trl_loss, exact
):
    if exact:
        monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", ExactLogProbs)
    tolerance = 1e-8 if exact else 1e-6
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, batch = _deltacli(tiny_llama, eight_pairs, loss)
    ours, our_grads = _deltacli_loss_and_grads(trainer, batch)

    # TRL adds the adapter itself (given an adapter already trained, its reference would be a
    # copy of that adapter, not the base); deltacli's LoRA values are copied in afterwards.
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    dataset = load_dataset("json", data_files=str(eight_pairs["train"]), split="train")
    args = trl.DPOConfig(
        output_dir=str(tmp_path), beta=BETA, loss_type=[trl_loss], max_length=64,
        per_device_train_batch_size=PAIRS, report_to=[], use_cpu=True, bf16=False,
    )  # fmt: skip
    dpo = trl.DPOTrainer(
        model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=config,
    )  # fmt: skip
    model = dpo.model
    assert list(model.peft_config) == ["default"]  # the reference is the adapter disabled
    values = {k: v.detach() for k, v in trainer.deltas.state_dict().items()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                param.copy_(values[key])
    theirs_batch = next(iter(dpo.get_train_dataloader()))
    dpo.model.eval()
    theirs = dpo.compute_loss(dpo.model, theirs_batch)
    theirs.backward()
    assert ours == pytest.approx(float(theirs), abs=tolerance)
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            torch.testing.assert_close(
                our_grads[key], param.grad.to(torch.float64), rtol=0, atol=tolerance
            )


def test_reference_free_losses_equal_trls(tiny_llama, eight_pairs):
    """SimPO (TRL's CPO trainer, loss_type simpo) and ORPO's odds-ratio term (TRL's ORPO
    trainer) on deltacli's per-token mean log-probabilities: same loss, same gradients. ORPO's
    SFT term is the chosen answer's mean NLL (TRL's also counts the prompt's tokens); TRL
    computes its odds ratio in float32, so ORPO agrees to float32's 1e-6."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    stub = types.SimpleNamespace(
        beta=BETA, simpo_gamma=0.5, label_smoothing=0.0, alpha=0.0, loss_type="simpo",
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
    )  # fmt: skip
    for loss in ("simpo", "orpo"):
        trainer, batch = _deltacli(tiny_llama, eight_pairs, loss)
        ours, our_grads = _deltacli_loss_and_grads(trainer, batch)
        trainer.optimizer.zero_grad(set_to_none=True)
        chosen, rejected = policy_logps(trainer.model, batch).means()
        if loss == "simpo":
            theirs = CPOTrainer.cpo_loss(stub, chosen, rejected)[0].mean()
        else:
            odds = ORPOTrainer.odds_ratio_loss(stub, chosen, rejected)[0]
            theirs = (-chosen).mean() - odds.mean()
        theirs.backward()
        tolerance = 1e-8 if loss == "simpo" else 1e-6
        assert ours == pytest.approx(float(theirs), abs=tolerance), loss
        for name, param in trainer.deltas.parameters().items():
            torch.testing.assert_close(our_grads[name], param.grad, rtol=0, atol=tolerance)


def test_sft_weight_adds_the_chosen_answers_mean_nll(tiny_llama, eight_pairs):
    """RPO (TRL's rpo_alpha): DPO's loss plus α times the chosen answer's mean NLL."""
    trainer, batch = _deltacli(tiny_llama, eight_pairs, "dpo")
    plain, _ = _deltacli_loss_and_grads(trainer, batch)
    anchored, _ = _deltacli(tiny_llama, eight_pairs, "dpo")
    anchored.pairs.loss = dataclasses.replace(anchored.pairs.loss, sft_weight=0.5)
    with torch.no_grad():
        chosen, _ = policy_logps(anchored.model.eval(), batch).means()
    total, _ = _deltacli_loss_and_grads(anchored, batch)
    assert total == pytest.approx(plain - 0.5 * float(chosen.mean()), abs=1e-10)
