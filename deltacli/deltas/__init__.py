"""Delta kinds. Importing this package registers every shipped kind."""

from deltacli.deltas import lora, specify
from deltacli.deltas.base import KINDS, Delta, DeltaConfig, DeltaSet, attach, kind_class, register

__all__ = [
    "KINDS",
    "Delta",
    "DeltaConfig",
    "DeltaSet",
    "attach",
    "kind_class",
    "lora",
    "register",
    "specify",
]
