"""Reading and writing safetensors files one tensor at a time.

The `safetensors` library reads through a memory map (pages it touched stay resident while
the file is open) and writes from a complete dict of tensors (issue safetensors#458: about
twice the tensors' size in RAM). `merge` must hold little more than one tensor, so this module
does the two things the library does not: plain reads of single tensors at their offsets, and
a writer that puts the header first (every name, dtype and shape is known before the data)
and then appends each tensor as it comes. The files are ordinary safetensors files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from deltacli.errors import DeltacliError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class ShardReader:
    """One safetensors file: its header at once, its tensors one `read` at a time.

    The header is checked against the file before anything is read: every tensor's bytes
    must match its dtype and shape and lie inside the file, so a truncated download or a
    damaged shard is refused by name, never read as zeros."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = path.open("rb")
        try:
            self._read_header()
        except BaseException:
            self.file.close()
            raise

    def _read_header(self) -> None:
        path, size = self.path, os.fstat(self.file.fileno()).st_size
        try:
            (length,) = struct.unpack("<Q", self.file.read(8))
            if 8 + length > size:
                raise ValueError(f"its header claims {length:,} bytes of a {size:,}-byte file")
            header = json.loads(self.file.read(length))
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self.offsets = {name: entry["data_offsets"] for name, entry in header.items()}
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
            self.info = {
                name: TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]))
                for name, entry in entries
            }
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DeltacliError(f"{path} is not a safetensors file ({error})") from None
        self.data_start = 8 + length
        for name, info in self.info.items():
            start, end = self.offsets[name]
            if end - start != info.nbytes or start < 0:
                raise DeltacliError(
                    f"{path}: the header gives tensor {name} {end - start:,} bytes, but its "
                    f"dtype and shape need {info.nbytes:,}; the file is damaged"
                )
            if self.data_start + end > size:
                found = max(0, size - self.data_start - start)
                raise DeltacliError(
                    f"{path} ends early: tensor {name} needs {info.nbytes:,} bytes, the file "
                    f"holds {found:,} of them ({size:,} bytes in all); download or copy it again"
                )

    def read(self, name: str) -> torch.Tensor:
        start, end = self.offsets[name]
        buffer = bytearray(end - start)
        self.file.seek(self.data_start + start)
        got = self.file.readinto(buffer)
        if got != len(buffer):  # the file shrank after its header was checked
            raise DeltacliError(
                f"{self.path} ends early: tensor {name} needs {len(buffer):,} bytes, "
                f"{got:,} were read"
            )
        info = self.info[name]
        if not buffer:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)

    def byte_range(self, name: str) -> tuple[int, int]:
        """Where the tensor's bytes lie in the file: (offset, length)."""
        start, end = self.offsets[name]
        return self.data_start + start, end - start

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShardWriter:
    """Writes the header for `layout` (name -> dtype and shape, in file order), then takes
    the tensors one by one in that order."""

    def __init__(self, path: Path, layout: dict[str, TensorInfo], metadata: dict[str, str]) -> None:
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, info in layout.items():
            header[name] = {
                "dtype": NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
        self.layout = layout
        self.pending = list(layout)
        self.file: BinaryIO = path.open("wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._next(name, TensorInfo(tensor.dtype, tuple(tensor.shape)))
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))

    def copy(self, name: str, reader: ShardReader, key: str) -> None:
        """Copy an unchanged tensor's bytes file to file, in the kernel where it can."""
        self._next(name, reader.info[key])
        offset, length = reader.byte_range(key)
        self.file.flush()
        source, target = reader.file.fileno(), self.file.fileno()
        while length:
            try:
                done = os.copy_file_range(source, target, length, offset)
            except OSError:  # another filesystem, or no copy_file_range: copy in user space
                reader.file.seek(offset)
                done = self.file.write(reader.file.read(min(length, 1 << 26)))
                self.file.flush()
            if done == 0:
                raise DeltacliError(f"{reader.path} ends early, inside tensor {key}")
            offset, length = offset + done, length - done

    def _next(self, name: str, info: TensorInfo) -> None:
        if not self.pending or self.pending[0] != name:
            raise ValueError(f"tensor {name} written out of order")
        if info != self.layout[name]:
            raise ValueError(f"tensor {name} does not match the header written for it")
        self.pending.pop(0)

    def close(self) -> None:
        self.file.close()
        if self.pending:
            raise ValueError(f"{len(self.pending)} tensors were never written")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.file.close()
