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
from deltacli.models import HEAD_NAMES

# Top-level modules that are a task or LM head: never targets of `all-linear`.
_HEADS = (*HEAD_NAMES, "lm_head")

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


def features(module: nn.Module) -> tuple[int, int]:
    """A linear layer's (in, out) features; Conv1D stores its weight as (in, out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def linear_targets(
    model: nn.Module, patterns: list[str] | None, presets: dict[str, list[str]], kind: str
) -> list[str]:
    """The linear modules a delta attaches to: `patterns`, `[all-linear]` (every linear layer
    of the body), or, for null, the preset of the model's architecture."""
    modules = modules_by_name(model)
    if patterns == ["all-linear"]:
        return [n for n, m in modules.items() if is_linear(m) and n.split(".")[0] not in _HEADS]
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in presets:
            raise DeltacliError(
                f"no {kind} target preset for model type {model_type!r}; name the modules, "
                "e.g. deltas.0.targets=[q_proj,v_proj], or use [all-linear]"
            )
        patterns = presets[model_type]
    return select(modules, patterns, what="linear module", keep=lambda n: is_linear(modules[n]))


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
