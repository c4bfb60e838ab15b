"""Writing safetensors files so that a full disk is the `OSError` every caller handles.

safetensors reports a failed write as its own `SafetensorError` ("... No space left on device
(os error 28)"), which is not an `OSError`: callers that keep a checkpoint, clean up scratch
or print one line for a full disk would miss it and show a traceback instead.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltacli.errors import DeltacliError, first_line

_OS_ERROR = re.compile(r"os error (\d+)")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one line saying the file is missing or damaged."""
    if not path.is_file():
        raise DeltacliError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise DeltacliError(
            f"{path} is not a valid safetensors file ({first_line(error)})"
        ) from None


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as error:
        found = _OS_ERROR.search(str(error))
        code = int(found.group(1)) if found else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from error
