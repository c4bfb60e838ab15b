"""A causal LM's loss without its `[tokens × vocabulary]` logits, in training and evaluation.

The model's own head turns every position into a vocabulary-wide row of logits — 4,096
positions × SmolLM2's 49,152 tokens is 805 MB in float32, and its log-softmax and gradient
as much again each — although instruction tuning counts the loss on the answers only. Here
the decoder runs with its output layer passed through, the positions whose label counts
are picked out, and the output layer and cross-entropy run on them a chunk at a time. Peak
memory is one chunk's logits; the result is the same sum as `losses.token_loss`.

Where the output layer is a plain linear layer (its weight and bias are all it computes,
whether or not they train), each chunk's gradients are computed in the forward pass — the
loss's gradient to the logits is softmax − one-hot, known as soon as the loss is — and the
backward pass only scales them: no chunk runs twice. Where a delta changes the layer (LoRA
or IA3 hooks on `lm_head`, a parametrization), it is called as a module, each chunk
recomputed in the backward pass (activation checkpointing), so the delta trains as in the
plain step. Models that change the logits after the output layer (soft-capping, logit
scales) keep the plain step.

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
        self.reads_weight = plain_linear(head)  # the chunks' gradients in the forward pass

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
        if self.reads_weight:
            head = self.head
            return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, self.rows)
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


class _LinearCrossEntropy(torch.autograd.Function):
    """Output layer + summed cross-entropy, a chunk of `rows` positions at a time, with the
    gradients to the hidden states, weight and bias computed in the forward pass (logits
    never kept, nothing recomputed); the backward pass scales them by the loss's gradient.
    Under autocast the matmuls run in its dtype and the softmax in float32, as in the plain
    head + `losses.precise`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        # Autograd is off inside `forward`; what it will want is `needs_input_grad`.
        wants = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(hidden) if wants[0] else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if wants[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), rows):
            chunk, target = hidden[i : i + rows], targets[i : i + rows]
            logits = _logits(chunk, weight, bias)
            dtype = logits.dtype
            # One float32 buffer per chunk, turned in place into log-probabilities, then
            # into softmax − one-hot (the sum's gradient to the logits).
            work = precise(logits)
            del logits
            work.sub_(work.logsumexp(dim=-1, keepdim=True))
            total -= work.gather(1, target[:, None]).sum()
            if any(wants):
                work.exp_()
                work[torch.arange(len(target), device=target.device), target] -= 1.0
                d_logits = work.to(dtype)  # the matmul's dtype, as autograd would hand it
                if d_hidden is not None:
                    d_hidden[i : i + rows] = d_logits @ weight.to(dtype)
                if d_weight is not None:
                    d_weight += (d_logits.T @ chunk.to(dtype)).float()
                if d_bias is not None:
                    d_bias += d_logits.float().sum(0)
                del d_logits
            del work  # before the next chunk's logits exist
        ctx.grads = (d_hidden, d_weight, d_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, d_total):
        d_hidden, d_weight, d_bias = ctx.grads
        ctx.grads = None
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if d_hidden is None else d_hidden * d_total.to(d_hidden.dtype),
            None if d_weight is None else (d_weight * d_total).to(weight_dtype),
            None if d_bias is None else (d_bias * d_total).to(bias_dtype),
            None,
            None,
        )


def _logits(chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits, in the matmul's dtype (the autocast's, under one)."""
    return F.linear(chunk, weight, bias)


def plain_linear(head: nn.Module) -> bool:
    """Whether `head` computes nothing but `F.linear` of its own weight and bias: not a
    subclass (a parametrized or quantised layer), no hooks (LoRA, IA3, SIFT act through
    them). Only then may a loss read its weight directly."""
    return type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks


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
    if not chunked.reads_weight:
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
