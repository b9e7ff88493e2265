import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from sd3fp8.errors import ModelLoadError
from sd3fp8.io.checkpoint import LazyTensors, read_header


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a.weight": torch.randn(4, 8).to(torch.float8_e4m3fn), "a.scale_weight": torch.tensor(0.5),
               "b": torch.randn(3, dtype=torch.bfloat16)}, str(path), metadata={"format": "pt"})
    return path


def raw_file(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_reads_header_and_tensors(good_file):
    h = read_header(good_file)
    assert h.tensors["a.weight"].dtype == torch.float8_e4m3fn and h.tensors["a.weight"].shape == (4, 8)
    assert h.tensors["a.scale_weight"].shape == () and h.metadata == {"format": "pt"}
    with LazyTensors(good_file) as f:
        assert f.get("b").dtype == torch.bfloat16
        with pytest.raises(ModelLoadError, match="missing tensor 'c'"):
            f.get("c")


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-5])
    with pytest.raises(ModelLoadError, match="truncated: tensor"):
        read_header(cut)
    cut.write_bytes(data[:20])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_header(cut)


@pytest.mark.parametrize("payload,message", [
    (pickle.dumps({"state_dict": {}}), "is a pickle"),
    (b"PK\x03\x04" + b"\0" * 100, "zip archive"),
])
def test_pickles_are_refused_without_unpickling(tmp_path, payload, message):
    path = tmp_path / "model.ckpt"
    path.write_bytes(payload)
    with pytest.raises(ModelLoadError, match=message):
        read_header(path)


def test_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ModelLoadError, match="never unpickled"):
        read_header(path)


@pytest.mark.parametrize("header,data,message", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 16, "header lies"),
    ({"w": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype 'Q4_K'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
    ({"w": {"shape": [1]}}, b"", "malformed header entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
])
def test_lying_headers(tmp_path, header, data, message):
    with pytest.raises(ModelLoadError, match=message):
        read_header(raw_file(tmp_path / "x.safetensors", header, data))


def test_garbage_and_missing_files(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{{{{{")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_header(path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a safetensors file, or truncated"):
        read_header(path)
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_header(tmp_path / "none.safetensors")


def test_the_malloc_threshold_change_is_logged(caplog):
    """Reading files changes a process-wide allocator setting: never silently (here called unwrapped of its once-cache)."""
    import logging

    from sd3fp8.io import checkpoint

    with caplog.at_level(logging.INFO, logger="sd3fp8.io.checkpoint"):
        took = checkpoint.return_freed_memory_to_os.__wrapped__(2**20)
    if took:  # glibc
        assert "set glibc's M_MMAP_THRESHOLD to 1048576 bytes for this process" in caplog.text
    else:
        assert "not glibc" in caplog.text or "refused" in caplog.text
