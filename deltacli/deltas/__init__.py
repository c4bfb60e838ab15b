"""Delta kinds. Importing this package registers every shipped kind (one module each)."""

from deltacli.deltas import (  # noqa: F401
    adapter,
    ia3,
    lora,
    prefix,
    prompt,
    sift,
    specify,
    subspace,
)
from deltacli.deltas.base import KINDS, Delta, DeltaConfig, DeltaSet, attach, kind_class, register

__all__ = ["KINDS", "Delta", "DeltaConfig", "DeltaSet", "attach", "kind_class", "register"]
