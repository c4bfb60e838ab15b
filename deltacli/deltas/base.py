"""The one delta abstraction: a config dataclass, a class that attaches it, and a registry.

A delta changes a frozen model by `h <- h + s * Δh` somewhere (addition, reparameterisation) or
by unfreezing a chosen subset of its weights (specification). The trainer, the saver and the
inspector only ever see what this module exposes: which parameters train, what tensors to
save, and how saved tensors are named in PEFT's format. They never ask which kind they hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.hooks import RemovableHandle

from deltacli.config.schema import POSITIVE, check_ranges, option
from deltacli.errors import DeltacliError, did_you_mean
from deltacli.models.precision import trainable_dtype

Increment = Callable[[torch.Tensor], torch.Tensor]

# PEFT keys a model's own tensors (and a task head, for most methods) under this prefix;
# prompt-learning methods (prompt, prefix) keep the task head one level up.
PEFT_PREFIX = "base_model.model."
PEFT_PROMPT_LEARNING_PREFIX = "base_model."


@dataclasses.dataclass
class DeltaConfig:
    """Hyper-parameters of one delta, exactly as a recipe's `deltas:` item spells them."""

    kind: ClassVar[str]
    lr: float | None = option(
        None,
        "this delta's own peak learning rate (null: train.lr); composed deltas differ (MAM)",
        POSITIVE,
        kw_only=True,
    )
    init_from: str | None = option(
        None,
        "start from this saved delta's tensors (a delta folder with a delta of this kind on "
        "the same base: SFT before DPO, or another task's delta); null: the kind's own start",
        kw_only=True,
    )

    def __post_init__(self) -> None:
        check_ranges(self, f"{self.kind} ")


class Delta(ABC):
    """One delta attached to one model.

    Subclasses set `kind`, `config_class` and, where PEFT has the same method, `peft_type`
    with `peft_config` and `from_peft` (the two directions of PEFT's `adapter_config.json`);
    `attach` fills `self.params` with the parameters to train, named as in the model.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[DeltaConfig]]
    peft_type: ClassVar[str | None] = None
    mergeable: ClassVar[bool] = False  # linear in the base weights, so `merge` can fold it in
    needs_base: ClassVar[bool] = True  # its increments depend on the base weight existing
    shardable: ClassVar[bool] = True  # trains on FSDP's shards (does not write into W)
    initial_from_base: ClassVar[bool] = False  # starts from the base's own values
    switchable: ClassVar[bool] = True  # can be switched off (a preference reference pass)

    def __init__(self, config: DeltaConfig) -> None:
        self.config = config
        self.params: dict[str, nn.Parameter] = {}
        self._undo: list[Callable[[], object]] = []
        self.enabled = True  # off: the model computes as its base does (`DeltaSet.switched_off`)

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Change `model` in place and record the parameters to train in `self.params`.

        Every change goes through the ledger below (`add_module`, `add_hook` ...), so that
        `detach` can undo it without a kind having to remember what it did."""

    def add_module(self, owner: nn.Module, name: str, module: nn.Module) -> None:
        _claim(owner, name)
        owner.add_module(name, module)
        self._undo.append(lambda: delattr(owner, name))

    def add_parameter(self, owner: nn.Module, name: str, param: nn.Parameter) -> None:
        _claim(owner, name)
        owner.register_parameter(name, param)
        self._undo.append(lambda: delattr(owner, name))

    def add_buffer(self, owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
        _claim(owner, name)
        owner.register_buffer(name, tensor)
        self._undo.append(lambda: delattr(owner, name))

    def add_hook(self, register: Callable[..., RemovableHandle], hook: Callable, **options) -> None:
        """Register `hook` through `register` (a module's `register_forward_hook` ...), gated
        so that it acts only while the delta is on."""

        def gated(*args, **kwargs):
            return hook(*args, **kwargs) if self.enabled else None

        self._undo.append(register(gated, **options).remove)

    def on_detach(self, undo: Callable[[], object]) -> None:
        """Anything else `detach` must undo (restoring a setting, a weight)."""
        self._undo.append(undo)

    def detach(self) -> None:
        """Undo what `attach` recorded, newest first, leaving the model as it was."""
        while self._undo:
            self._undo.pop()()
        self.params = {}

    def switch(self, on: bool) -> None:
        """Turn the delta on or off; off, the model computes what its base computes (a
        preference run's reference). Hooks stop acting; a kind that writes into the base's
        tensors also puts the base's values back while off."""
        self.enabled = on

    def hold_reference(self) -> int:
        """Keep what switching off needs that the model does not hold (specification kinds:
        the base's values of the tensors they train); returns its size in bytes."""
        return 0

    def release_reference(self) -> None:  # noqa: B027 (most kinds hold nothing)
        """Drop what `hold_reference` kept."""

    def export(self) -> tuple[DeltaConfig, dict[str, torch.Tensor]]:
        """The config and tensors to save: by default the trained parameters as they are
        (whole, where FSDP shards them: every process must call this). A kind that trains
        through a reparameterisation saves its folded result instead."""
        return self.config, {name: whole(p) for name, p in self.params.items()}

    def saved_names(self) -> list[str]:
        """Names of the tensors `export` saves (and `load` takes back)."""
        return list(self.params)

    def load(self, values: dict[str, torch.Tensor]) -> None:
        """Take saved tensors back (by the names `saved_names` gives)."""
        with torch.no_grad():
            for name, param in self.params.items():
                assign(param, values[name])

    def learning_rates(self, rate: float) -> dict[str, float]:
        """Each trained tensor's peak learning rate, given the delta's own: one rate for all,
        unless a kind sets them apart (LoRA+: B faster than A)."""
        return dict.fromkeys(self.params, rate)

    def calibrate(  # noqa: B027 (an optional hook: most kinds need no data)
        self, model: nn.Module, batches: Iterable[dict], accelerator: Any
    ) -> None:
        """Look at data before training starts (SIFT chooses its indices); most kinds need not."""

    def densities(self) -> dict[str, float]:
        """Share of each changed matrix that the delta touches, for sparse kinds."""
        return {}

    def extra_state(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint keeps besides the trained parameters, by name (SIFT:
        the entries it chose)."""
        return {}

    def load_extra_state(self, values: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Take `extra_state` back when a run resumes."""

    def delta_weights(self, values: dict[str, torch.Tensor]) -> dict[str, Increment]:
        """What merging adds to each base weight this delta changes.

        `values` holds the delta's trained tensors by parameter name. Each returned function
        takes the base tensor (fp32; zeros where the base checkpoint lacks it, as for a new
        task head) and gives the increment ΔW, so several deltas combine as W + Σ wᵢ ΔWᵢ.
        """
        raise NotImplementedError(f"{self.kind} deltas cannot be merged into base weights")

    def peft_key(self, name: str) -> str:
        """The key PEFT's `adapter_model.safetensors` uses for the parameter `name`."""
        return PEFT_PREFIX + name

    def head_key(self, name: str) -> str:
        """The key PEFT gives a task-head tensor saved beside this method (`modules_to_save`)."""
        return PEFT_PREFIX + name

    def peft_config(self, model: nn.Module) -> dict:
        """This delta's fields of PEFT's `adapter_config.json` (only where `peft_type` is set)."""
        raise NotImplementedError(f"{self.kind} has no PEFT equivalent")

    @classmethod
    def from_peft(cls, config: dict) -> dict:
        """The recipe's `deltas:` item that rebuilds PEFT's adapter of this `peft_type` from
        its `adapter_config.json` (validated by the caller)."""
        raise NotImplementedError(f"{cls.kind} has no PEFT equivalent")


def peft_patterns(modules: list[str] | str | None) -> list[str] | None:
    """PEFT's `target_modules` as deltacli patterns: a list of suffixes stays as it is, and a
    single string is a regular expression over the whole name."""
    return [f"re:{modules}"] if isinstance(modules, str) else modules


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's full value, detached: gathered from every process where FSDP shards it
    (a collective call), as it is otherwise."""
    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    return tensor.detach()


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full `value` into `param`, each process keeping its shard where FSDP shards it."""
    param.copy_(sharded_like(param, value.to(dtype=param.dtype)))


def sharded_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A full `value` laid out as `param` is: this process's shard where FSDP shards it (an
    optimizer's moments of a sharded parameter are sharded the same way)."""
    value = value.to(device=param.device)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def trainable_like(weight: torch.Tensor) -> dict:
    """Where and in what dtype a delta's tensors beside `weight` live: on its device, in
    float32 over a half-precision or quantised weight (`precision.trainable_dtype`)."""
    return {"device": weight.device, "dtype": trainable_dtype(weight)}


KINDS: dict[str, type[Delta]] = {}


def register(cls: type[Delta]) -> type[Delta]:
    """Class decorator: make a delta kind available to recipes by its `kind` name."""
    if cls.kind in KINDS:
        raise ValueError(f"delta kind {cls.kind!r} is registered twice")
    if "kind" in vars(cls.config_class):
        raise ValueError(f"{cls.config_class.__name__} already belongs to another kind")
    cls.config_class.kind = cls.kind
    KINDS[cls.kind] = cls
    return cls


def kind_for_peft(peft_type: str | None) -> type[Delta]:
    """The kind that reads and writes PEFT's adapters of `peft_type`."""
    for cls in KINDS.values():
        if cls.peft_type is not None and cls.peft_type == peft_type:
            return cls
    supported = sorted(c.peft_type for c in KINDS.values() if c.peft_type)
    raise DeltacliError(
        f"PEFT adapters of type {peft_type!r} are not supported yet "
        f"(supported: {', '.join(supported)})"
    )


def kind_class(kind: str) -> type[Delta]:
    """The registered class of `kind`, or a clear error listing the kinds there are."""
    try:
        return KINDS[kind]
    except KeyError:
        raise DeltacliError(
            f"unknown delta kind {kind!r}{did_you_mean(str(kind), list(KINDS))}; "
            f"known kinds: {', '.join(sorted(KINDS))}"
        ) from None


class DeltaSet:
    """The deltas of one recipe attached to one model, plus the task head when it trains.

    Several deltas compose: each attaches in turn, and the trainable set is their union. The
    head is kept apart because PEFT saves it as `modules_to_save`, not as part of a method.
    """

    def __init__(
        self,
        model: nn.Module,
        deltas: list[Delta],
        head: Delta | None,
        trainable_before: dict[nn.Parameter, bool] | None = None,
    ) -> None:
        self.model = model
        self.deltas = deltas
        self.head = head
        # Which base parameters trained before `attach` froze the model: `detach` restores it.
        self.trainable_before = trainable_before or {}

    @property
    def members(self) -> list[Delta]:
        return [*self.deltas, *([self.head] if self.head else [])]

    def parameters(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter by model name, each once even where deltas overlap."""
        params: dict[str, nn.Parameter] = {}
        for delta in self.members:
            params.update(delta.params)
        return params

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The current value of every trainable parameter, whole (to restore the best
        epoch; under FSDP every process must call this)."""
        return {name: whole(p) for name, p in self.parameters().items()}

    def follow_sharded(self, model: nn.Module) -> None:
        """Point every member at the parameters `model` holds now: FSDP replaces them with
        sharded ones when it wraps the model (same names, new objects)."""
        for delta in self.members:
            delta.params = {name: model.get_parameter(name) for name in delta.params}

    def export(self) -> tuple[list[DeltaConfig], dict[str, torch.Tensor]]:
        """What a saved delta holds: the deltas' configs as saved, and the tensors under
        their keys in `adapter_model.safetensors`."""
        configs, tensors = [], {}
        for delta in self.members:
            config, values = delta.export()
            if delta is not self.head:
                configs.append(config)
            tensors.update({self._key(delta, name): value for name, value in values.items()})
        return configs, tensors

    def export_initial(self) -> dict[str, torch.Tensor]:
        """The saved tensors as they start, under their file keys: what a run keeps beside
        its delta, so its change `trained - initial` is known exactly later (the unified
        subspace). Kinds that start from the base's own values need not keep them."""
        tensors = {}
        for delta in self.members:
            if not delta.initial_from_base:
                _, values = delta.export()
                tensors |= {self._key(delta, name): value for name, value in values.items()}
        return tensors

    def keys(self) -> dict[str, str]:
        """Saved tensor name -> key in `adapter_model.safetensors` (for loading)."""
        return {name: self._key(d, name) for d in self.members for name in d.saved_names()}

    def load_saved(self, values: dict[str, torch.Tensor]) -> None:
        """Take a saved delta's tensors (by name) back into every member."""
        for delta in self.members:
            delta.load({name: values[name] for name in delta.saved_names()})

    def calibrate(self, model: nn.Module, batches: Iterable[dict], accelerator: Any) -> None:
        for delta in self.members:
            delta.calibrate(model, batches, accelerator)

    def densities(self) -> dict[str, float]:
        return {name: share for delta in self.members for name, share in delta.densities().items()}

    @property
    def peft_method(self) -> Delta | None:
        """The delta PEFT sees this set as: the only one, where PEFT has its method."""
        if len(self.deltas) == 1 and self.deltas[0].peft_type is not None:
            return self.deltas[0]
        return None

    def _key(self, delta: Delta, name: str) -> str:
        """PEFT's key where PEFT has the method; the head goes where that method keeps it."""
        if delta is self.head:
            return self.peft_method.head_key(name) if self.peft_method else PEFT_PREFIX + name
        return delta.peft_key(name)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Every tensor a resumed run needs: the trained parameters and the kinds' extra
        state, by name."""
        extra = {k: v for delta in self.members for k, v in delta.extra_state().items()}
        return {**self.state_dict(), **extra}

    def restore_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take `checkpoint_state` back."""
        for delta in self.members:
            delta.load_extra_state({name: tensors[name] for name in delta.extra_state()})
        self.set_values(tensors)

    def set_values(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy values in: one whole tensor for every trainable parameter, of its shape."""
        with torch.no_grad():
            for name, param in self.parameters().items():
                assign(param, tensors[name])

    def hold_reference(self) -> int:
        """Ready every delta to be switched off (see `Delta.hold_reference`): the bytes kept."""
        return sum(delta.hold_reference() for delta in self.deltas)

    def release_reference(self) -> None:
        for delta in self.deltas:
            delta.release_reference()

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[None]:
        """The base model, for as long as the block runs: every delta off (the task head, a
        new module with no base value, stays). A preference run's reference policy is the
        same model in memory, not a copy."""
        for delta in self.deltas:
            delta.switch(False)
        try:
            yield
        finally:
            for delta in self.deltas:
                delta.switch(True)

    def detach(self) -> None:
        for delta in reversed(self.members):
            delta.detach()
        for param, trainable in self.trainable_before.items():
            param.requires_grad_(trainable)


class PromptLearning(Delta):
    """A delta PEFT stores as prompt learning (prefix and prompt tuning): one tensor,
    `prompt_embeddings`, and the head under PEFT's prompt-learning prefix."""

    def peft_key(self, name: str) -> str:
        return "prompt_embeddings"

    def head_key(self, name: str) -> str:
        return PEFT_PROMPT_LEARNING_PREFIX + name


class NameTaken(Exception):
    """A delta would attach under a name its module already has: a second delta of the same
    kind on the same module, which would silently replace the first's tensors."""

    def __init__(self, owner: nn.Module, name: str) -> None:
        super().__init__(name)
        self.owner, self.name = owner, name


def _claim(owner: nn.Module, name: str) -> None:
    if name in owner._modules or name in owner._parameters or name in owner._buffers:
        raise NameTaken(owner, name)


def attach(model: nn.Module, configs: list[DeltaConfig], head: DeltaConfig | None) -> DeltaSet:
    """Freeze `model`, attach each delta in order, and unfreeze exactly what they train."""
    trainable_before = {param: param.requires_grad for param in model.parameters()}
    model.requires_grad_(False)
    deltas = [kind_class(c.kind)(c) for c in configs]
    head_delta = kind_class(head.kind)(head) if head else None
    for index, delta in enumerate([*deltas, *([head_delta] if head_delta else [])]):
        try:
            delta.attach(model)
        except NameTaken as taken:
            where = next((n for n, m in model.named_modules() if m is taken.owner), "")
            raise DeltacliError(
                f"deltas.{index} ({delta.kind}) attaches to {where or 'the model'}, which an "
                f"earlier {delta.kind} delta already holds ({taken.name}); one {delta.kind} "
                "per module: give the deltas different targets, or make them one delta"
            ) from None
        for param in delta.params.values():
            param.requires_grad_(True)
    return DeltaSet(model, deltas, head_delta, trainable_before)
