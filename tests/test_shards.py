"""The streaming safetensors reader and writer agree with the safetensors library."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltacli.errors import DeltacliError
from deltacli.models.shards import ShardReader, ShardWriter, TensorInfo

TENSORS = {
    "w": torch.randn(3, 4),
    "half": torch.randn(5).to(torch.bfloat16),
    "ids": torch.arange(6).reshape(2, 3),
    "empty": torch.empty(0, 3),
    "scalar": torch.tensor(3.0),
    "mask": torch.tensor([True, False]),
}


def test_reads_what_the_library_wrote_and_writes_what_it_reads(tmp_path):
    save_file(TENSORS, tmp_path / "in.safetensors", metadata={"format": "pt"})
    with ShardReader(tmp_path / "in.safetensors") as reader:
        assert reader.metadata == {"format": "pt"}
        assert {name: reader.read(name) for name in reader.info}.keys() == TENSORS.keys()
        for name, tensor in TENSORS.items():
            assert torch.equal(reader.read(name), tensor)
            assert reader.info[name] == TensorInfo(tensor.dtype, tuple(tensor.shape))
        with ShardWriter(
            tmp_path / "out.safetensors", dict(reader.info), reader.metadata
        ) as writer:
            for name in reader.info:
                writer.write(name, reader.read(name))
    written = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(written[name], tensor) for name, tensor in TENSORS.items())


def test_writer_refuses_out_of_order_or_mismatched_tensors(tmp_path):
    layout = {"a": TensorInfo(torch.float32, (2,)), "b": TensorInfo(torch.float32, (3,))}
    writer = ShardWriter(tmp_path / "x.safetensors", layout, {})
    with pytest.raises(ValueError, match="out of order"):
        writer.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="does not match the header"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 tensors were never written"):
        writer.close()


def test_a_file_that_is_not_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(DeltacliError, match="is not a safetensors file"):
        ShardReader(tmp_path / "bad.safetensors")
