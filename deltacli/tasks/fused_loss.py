"""A causal LM's loss without its `[tokens × vocabulary]` logits, in training and evaluation.

The model's own head turns every position into a vocabulary-wide row of logits — 4,096
positions × SmolLM2's 49,152 tokens is 805 MB in float32, and its log-softmax and gradient
as much again each — although instruction tuning counts the loss on the answers only. Here
the decoder runs with its output layer passed through, the positions whose label counts
are picked out, and the output layer and cross-entropy run on them a chunk at a time, each
chunk recomputed in the backward pass (activation checkpointing) rather than kept. Peak
memory is one chunk's logits; the result is the same sum as `losses.token_loss`.

The output layer is called as a module, so a delta on it (LoRA or IA3 on `lm_head`, full
fine-tuning of a tied embedding) trains as it does in the plain step. Models that change
the logits after the output layer (soft-capping, logit scales) keep the plain step.

On a GPU, `train.loss_kernel=liger` hands the same positions to liger-kernel's fused
linear cross-entropy instead (Triton kernels that compute the gradients during the forward
pass, so nothing is recomputed); it reads the head's weight directly, so a head that a
delta changes through hooks or parametrizations keeps the chunked loss.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.checkpoint import checkpoint

from deltacli.errors import DeltacliError
from deltacli.labels import IGNORE
from deltacli.tasks.losses import aligned, precise

# Logit entries per chunk (64 MB in float32): SmolLM2's 49,152-token vocabulary gives 341
# positions a chunk, a 128k vocabulary 131.
CHUNK_ENTRIES = 2**24

# Configuration keys of models that transform the logits after the output layer.
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# `train.loss_kernel` values: the chunked PyTorch loss here, or liger-kernel's.
CHUNKED, LIGER = "chunked", "liger"
# Devices liger's Triton kernels run on (torch calls ROCm "cuda").
_TRITON_DEVICES = ("cuda", "xpu")


class PassThrough(nn.Module):
    """Stands in for the output layer while the decoder runs: returns the hidden states."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class ChunkedHeadLoss:
    """The summed token loss of a causal LM computed a chunk of positions at a time."""

    def __init__(self, head: nn.Linear, owner: nn.Module, attribute: str) -> None:
        self.head, self.owner, self.attribute = head, owner, attribute

    @classmethod
    def of(cls, model: nn.Module) -> ChunkedHeadLoss | None:
        """The chunked loss of `model`, or None where its logits are not exactly its output
        layer's (no plain linear head held by a module, or a transform after it)."""
        head = model.get_output_embeddings()
        owner, attribute = _owner(model, head)
        if not isinstance(head, nn.Linear) or owner is None:
            return None
        if any(getattr(model.config, key, None) for key in _AFTER_HEAD):
            return None
        return cls(head, owner, attribute)

    @classmethod
    def in_run(cls, model: nn.Module, accelerator: Accelerator) -> ChunkedHeadLoss | None:
        """`of` the model an accelerator prepared; None under FSDP, whose wrapped output
        layer cannot be swapped out (the one rule for training and evaluation)."""
        if accelerator.distributed_type == DistributedType.FSDP:
            return None
        return cls.of(accelerator.unwrap_model(model))

    @contextlib.contextmanager
    def hidden_states(self) -> Iterator[None]:
        """While open, the model's `logits` are the hidden states its head would read."""
        setattr(self.owner, self.attribute, PassThrough())
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, self.head)

    def of_batch(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        accelerator: Accelerator,
        *,
        per_row: bool = False,
    ) -> torch.Tensor:
        """`model` run on `inputs` with its head passed through, then the head + loss on
        the counted positions: the summed loss (`loss`), or each row's (`row_losses`)."""
        with self.hidden_states():
            hidden = model(**inputs).logits
        # The output layer runs outside the model's forward, so under the autocast that
        # accelerate wraps the forward in (a half-precision or quantised base's).
        with accelerator.autocast():
            return self.row_losses(hidden, labels) if per_row else self.loss(hidden, labels)

    @property
    def rows(self) -> int:
        """Positions per chunk."""
        return max(1, CHUNK_ENTRIES // self.head.out_features)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`hidden`: the model's output under `hidden_states()`. The loss summed over the
        label tokens that are not -100, the label at t + 1 predicted at t."""
        hidden, targets, counted, _ = _counted(hidden, labels)
        if len(counted) == 0:
            # Nothing counts (a stand-in micro-batch): a zero that still reaches every
            # weight the plain loss reaches, so the backward pass runs the same hooks.
            return self._chunk_loss(hidden[:1], targets.new_zeros(1)) * 0.0
        return self._summed(hidden.index_select(0, counted), targets.index_select(0, counted))

    def _summed(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed loss of counted positions (`targets` holds no -100)."""
        chunks = [
            checkpoint(self._chunk_loss, hidden[i : i + self.rows], targets[i : i + self.rows],
                       use_reentrant=False)
            for i in range(0, len(targets), self.rows)
        ]  # fmt: skip
        return torch.stack(chunks).sum()

    def row_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each row's summed loss in float32, as `loss` counts it, for evaluation (no graph
        kept): the plain head's logits of a 64-row eval batch would be the run's peak."""
        hidden, targets, counted, width = _counted(hidden, labels)
        sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
        for i in range(0, len(counted), self.rows):
            at = counted[i : i + self.rows]
            logits = precise(self.head(hidden.index_select(0, at)))
            losses = F.cross_entropy(logits, targets.index_select(0, at), reduction="none")
            sums.index_add_(0, at // width, losses.float())
        return sums

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(precise(self.head(hidden)), targets, reduction="sum")


class LigerHeadLoss(ChunkedHeadLoss):
    """The chunked loss's positions through liger-kernel's fused linear cross-entropy.
    Evaluation keeps the chunked rows (`row_losses`): it has no backward pass to fuse."""

    def __init__(self, chunked: ChunkedHeadLoss, kernel: Callable[..., torch.Tensor]) -> None:
        super().__init__(chunked.head, chunked.owner, chunked.attribute)
        self.kernel = kernel

    def _summed(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.kernel(self.head.weight, hidden, targets, self.head.bias)


def with_kernel(chunked: ChunkedHeadLoss, kernel: str) -> tuple[ChunkedHeadLoss, str | None]:
    """The loss `train.loss_kernel` asks for, or the chunked one and why it stays. Raises
    where liger cannot run at all (not installed, or no device for its Triton kernels)."""
    if kernel == CHUNKED:
        return chunked, None
    head = chunked.head
    device = head.weight.device.type
    # Triton's interpreter (TRITON_INTERPRET=1) runs the same kernels on the CPU, slowly:
    # for checking them without a GPU, as the tests do.
    if device not in _TRITON_DEVICES and os.environ.get("TRITON_INTERPRET") != "1":
        raise DeltacliError(
            f"train.loss_kernel={LIGER} runs Triton kernels on a GPU; this run is on the "
            f"{device}: use train.loss_kernel={CHUNKED}"
        )
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise DeltacliError(
            f"train.loss_kernel={LIGER} needs liger-kernel: pip install 'deltacli[liger]'"
        ) from None
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        # A parametrized or quantised layer is a subclass; LoRA and IA3 act through hooks.
        return chunked, "a delta or quantisation changes the output layer, whose weight liger reads"
    return LigerHeadLoss(chunked, LigerFusedLinearCrossEntropyLoss(reduction="sum")), None


def _counted(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Positions and labels aligned and flattened, the flat indices of the positions whose
    label counts, and the aligned row width (flat index // width = the row)."""
    hidden, targets = aligned(hidden, labels, shift=True)
    width = targets.shape[1]
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    return hidden, targets, (targets != IGNORE).nonzero().squeeze(1), width


def _owner(model: nn.Module, head: nn.Module) -> tuple[nn.Module | None, str]:
    """The module holding `head` as an attribute, and the attribute's name."""
    for name, module in model.named_modules():
        if module is head and name:
            parent, _, attribute = name.rpartition(".")
            return model.get_submodule(parent), attribute
    return None, ""
