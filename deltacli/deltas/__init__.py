"""Delta kinds. Importing this package registers every shipped kind."""

from deltacli.deltas import adapter, ia3, lora, prefix, prompt, sift, specify
from deltacli.deltas.base import KINDS, Delta, DeltaConfig, DeltaSet, attach, kind_class, register

__all__ = [
    "KINDS",
    "Delta",
    "DeltaConfig",
    "DeltaSet",
    "adapter",
    "attach",
    "ia3",
    "kind_class",
    "lora",
    "prefix",
    "prompt",
    "register",
    "sift",
    "specify",
]
