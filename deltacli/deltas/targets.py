"""Choosing modules and parameters by name.

Every delta says *where* it attaches with name patterns matched against `named_modules()` or
`named_parameters()`, so that one recipe works on any architecture whose names it knows. A
pattern is, by its form:

- `re:<regex>`: a regular expression that must match the whole name;
- a glob (contains `*`, `?` or `[`): matched against the whole name with `fnmatch`;
- otherwise a suffix on dot boundaries: `query` matches `bert.encoder.layer.0.attention.self.query`,
  and `attention.self.query` does too, but `uery` does not.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from deltacli.errors import DeltacliError
from deltacli.models.architectures import HEADS, LM_HEADS, architecture

# Top-level modules that are a task or LM head: never targets of `all-linear`.
_HEADS = (*HEADS, *LM_HEADS)

_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def matches(pattern: str, name: str) -> bool:
    """Whether `name` (a dotted module or parameter name) is chosen by `pattern`."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def collapse_indices(name: str) -> str:
    """`bert.encoder.layer.3.output.dense` -> `bert.encoder.layer.*.output.dense`: one line per
    kind of module, however many layers the model has."""
    return _INDEX.sub(".*", name)


def layer_index(name: str) -> int | None:
    """The first integer in a dotted name, which for every transformer stack is the layer."""
    found = _INDEX.search(name)
    return int(found.group(1)) if found else None


def select(
    names: Iterable[str],
    patterns: list[str],
    *,
    what: str,
    keep: Callable[[str], bool] = lambda name: True,
) -> list[str]:
    """The names that any pattern chooses, in model order; each pattern must choose something.

    `keep` narrows the candidates (e.g. to linear layers); a pattern that matches only names
    `keep` rejects is still an error, because the user asked for something that cannot be done.
    """
    names = list(names)
    candidates = [n for n in names if keep(n)]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {n for n in candidates if matches(pattern, n)}
        if not hits:
            raise DeltacliError(_no_match_message(pattern, candidates, what))
        chosen |= hits
    return [n for n in candidates if n in chosen]


def minimal_suffixes(chosen: list[str], all_names: Iterable[str]) -> list[str]:
    """The shortest suffix patterns that choose exactly `chosen` among `all_names`.

    Other tools (PEFT's `target_modules`) match by suffix; writing `["query", "value"]` keeps
    saved configs short and readable, falling back to full names only where a suffix would also
    catch modules that were not chosen.
    """
    all_names = list(all_names)
    chosen_set = set(chosen)
    suffixes: list[str] = []
    for name in chosen:
        parts = name.split(".")
        for start in range(len(parts) - 1, -1, -1):
            suffix = ".".join(parts[start:])
            caught = {n for n in all_names if matches(suffix, n)}
            if caught <= chosen_set:
                if suffix not in suffixes:
                    suffixes.append(suffix)
                break
    return suffixes


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer storing its weight transposed)."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as (in, out): GPT-2's Conv1D (PEFT's
    `fan_in_fan_out`)."""
    return isinstance(module, Conv1D)


def features(module: nn.Module) -> tuple[int, int]:
    """A linear layer's (in, out) features, whichever way it stores its weight."""
    if is_transposed(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_targets(
    model: nn.Module, patterns: list[str] | None, roles: tuple[str, ...], kind: str
) -> list[str]:
    """The linear modules a delta attaches to: `patterns`, `[all-linear]` (every linear layer
    of the body), or, for null, the architecture's patterns of `roles`."""
    modules = modules_by_name(model)
    if patterns == ["all-linear"]:
        return [n for n, m in modules.items() if is_linear(m) and n.split(".")[0] not in _HEADS]
    if patterns is None:
        fix = "name the modules, e.g. deltas.0.targets=[q_proj,v_proj], or use [all-linear]"
        patterns = architecture(model, f"{kind} target preset", fix).patterns(*roles)
    return select(modules, patterns, what="linear module", keep=lambda n: is_linear(modules[n]))


def in_layers(names: list[str], layers: list[int] | None, count: int) -> list[str]:
    """The names in the chosen layers of a `count`-layer stack (-1 is the last); all of them
    when `layers` is None."""
    if layers is None:
        return names
    wanted = set()
    for layer in layers:
        if not -count <= layer < count:
            raise DeltacliError(f"layer {layer} is out of range: the model has {count} layers")
        wanted.add(layer % count)
    return [n for n in names if layer_index(n) in wanted]


def layer_count(names: list[str]) -> int:
    """How many layers the stack these names come from has (the largest index + 1)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    if not indices:
        raise DeltacliError("`layers` was given but this model's names have no layer indices")
    return max(indices) + 1


def partner(name: str, candidates: list[str]) -> str | None:
    """The candidate in the same block as `name`: the one sharing the longest dotted prefix
    with it, which must reach past the block's index (`encoder.block.3.` is not
    `decoder.block.3.`)."""
    parts = name.split(".")

    def shared(other: str) -> int:
        count = 0
        for a, b in zip(parts, other.split("."), strict=False):
            if a != b:
                break
            count += 1
        return count

    best = max(candidates, key=shared, default=None)
    if best is None:
        return None
    common = parts[: shared(best)]
    return best if any(part.isdigit() for part in common) else None


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """`named_modules()` without the root, as a dict."""
    return {name: module for name, module in model.named_modules() if name}


def _no_match_message(pattern: str, candidates: list[str], what: str) -> str:
    shapes = sorted({collapse_indices(n) for n in candidates})
    leaves = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    close = difflib.get_close_matches(pattern, leaves, n=3, cutoff=0.5)
    close += difflib.get_close_matches(pattern, shapes, n=3, cutoff=0.4)
    if not close:
        close = shapes[:6]
    hint = ", ".join(dict.fromkeys(close))
    return f"no {what} matches {pattern!r}; close names: {hint}"
