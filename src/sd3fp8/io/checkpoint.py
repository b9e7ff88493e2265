"""Safetensors files, read defensively: the header is validated before any tensor is touched, and
pickled checkpoints are refused (never unpickled). Tensors are read lazily, one at a time, with
plain file reads into memory of their own (no memory map: see LazyTensors)."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from sd3fp8.errors import ModelLoadError
from sd3fp8.io.oserrors import os_errors
from sd3fp8.io.safe_read import parse_json
from sd3fp8.io.schemas import safetensors_metadata

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAX_DIMS = 32
INT64_MAX = 2**63 - 1
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# safetensors dtype -> (bytes per element, torch's name). Headers are read without importing torch
# (`sd3fp8 inspect FILE` stays fast); TensorInfo.dtype, DTYPES and DTYPE_NAMES give torch dtypes on demand.
DTYPE_INFO = {
    "F8_E4M3": (1, "float8_e4m3fn"), "F8_E5M2": (1, "float8_e5m2"), "BF16": (2, "bfloat16"), "F16": (2, "float16"),
    "F32": (4, "float32"), "F64": (8, "float64"), "I8": (1, "int8"), "U8": (1, "uint8"), "I16": (2, "int16"),
    "I32": (4, "int32"), "I64": (8, "int64"), "BOOL": (1, "bool"),
}


@functools.cache
def _torch_dtypes() -> dict:
    import torch

    return {name: getattr(torch, torch_name) for name, (_, torch_name) in DTYPE_INFO.items()}


def __getattr__(name: str):
    """DTYPES (safetensors name -> torch dtype) and DTYPE_NAMES (the reverse), built on first use."""
    if name == "DTYPES":
        return _torch_dtypes()
    if name == "DTYPE_NAMES":
        return {v: k for k, v in _torch_dtypes().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_PICKLE_MAGIC = {b"PK\x03\x04": "a zip archive (torch.save .pt/.ckpt)", b"\x80\x02": "a pickle", b"\x80\x03": "a pickle",
                 b"\x80\x04": "a pickle", b"\x80\x05": "a pickle"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype_name: str  # safetensors' name: F8_E4M3, BF16, F32, ...
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # [begin, end) within the data section

    @property
    def dtype(self) -> torch.dtype:
        return _torch_dtypes()[self.dtype_name]

    @property
    def itemsize(self) -> int:
        return DTYPE_INFO[self.dtype_name][0]

    @property
    def torch_name(self) -> str:
        """torch's name of the dtype (float8_e4m3fn, bfloat16, ...), without importing torch."""
        return DTYPE_INFO[self.dtype_name][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclasses.dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section in the file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def _refuse_non_safetensors(path: Path, head: bytes) -> None:
    for magic, what in _PICKLE_MAGIC.items():
        if head.startswith(magic):
            raise ModelLoadError(
                f"{path} is {what}, not safetensors: pickled checkpoints can run code when loaded and are never "
                f"unpickled here; convert it to .safetensors with a tool you trust"
            )


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header: every tensor's dtype, shape and byte range."""
    path = Path(path)
    with os_errors(path, "read", ModelLoadError):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            _refuse_non_safetensors(path, head)
            if len(head) < 8:
                raise ModelLoadError(f"{path}: file too short to be safetensors ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise ModelLoadError(f"{path}: not a safetensors file, or truncated (header length {header_len}, file {size} bytes)")
            raw = f.read(header_len)
    return parse_header(raw, path, 8 + header_len, size - 8 - header_len)


def parse_header(raw: bytes, path: Path, data_start: int, data_len: int) -> Header:
    """The header's JSON (``raw``) checked against the safetensors format and the data section's length."""
    header = parse_json(raw, f"{path}: corrupt safetensors header", ModelLoadError)
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = safetensors_metadata(header.pop("__metadata__", None), str(path))
    tensors, ranges = {}, []
    for name, entry in header.items():
        info = _tensor_info(name, entry, path)
        if info.offsets[1] > data_len:
            raise ModelLoadError(f"{path}: truncated: tensor {name!r} ends at byte {info.offsets[1]} of a {data_len}-byte data section")
        tensors[name] = info
        ranges.append((*info.offsets, name))
    ranges.sort()
    for (_, e0, n0), (b1, _, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise ModelLoadError(f"{path}: corrupt header: tensors {n0!r} and {n1!r} overlap")
    return Header(path, tensors, metadata, data_start)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


def _tensor_info(name: str, entry, path: Path) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape torch can hold, offsets matching the shape."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ModelLoadError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPE_INFO:
        shown = repr(dtype_name) if isinstance(dtype_name, str) else f"of type {type(dtype_name).__name__}"
        raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {shown}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_index(d) for d in shape):
        raise ModelLoadError(f"{path}: tensor {name!r} has an invalid shape (a list of at most {MAX_DIMS} sizes in 0..2^63-1)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets) or offsets[0] > offsets[1]:
        raise ModelLoadError(f"{path}: tensor {name!r} has invalid offsets (two byte positions, begin <= end)")
    itemsize = DTYPE_INFO[dtype_name][0]
    # torch computes strides as products of the sizes (zeros counted as one): they must fit int64
    if math.prod(max(d, 1) for d in shape) * itemsize > INT64_MAX:
        raise ModelLoadError(f"{path}: tensor {name!r} has shape {shape}, beyond what int64 sizes can address")
    info = TensorInfo(dtype_name, tuple(shape), (offsets[0], offsets[1]))
    expected = info.numel * itemsize
    if offsets[1] - offsets[0] != expected:
        raise ModelLoadError(f"{path}: tensor {name!r} header lies: {offsets[1] - offsets[0]} bytes for shape {shape} "
                             f"{dtype_name} ({expected} expected)")
    return info


@functools.lru_cache(maxsize=1)
def return_freed_memory_to_os(threshold: int = 2**20) -> bool:
    """Serve allocations above ``threshold`` bytes with their own memory maps (glibc's mallopt
    M_MMAP_THRESHOLD), for the whole process, once; logged. Returns whether the setting took effect.

    glibc otherwise serves anything under a dynamic threshold (up to 32 MB) from its heap and keeps
    freed heap memory: streaming an 8.5 GB FP8 checkpoint's tensors and their temporaries left
    peak RSS 3 GB above the model's size; with this, 0.7 GB. Off glibc there is nothing to set.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        log.info("not glibc: the malloc mmap threshold is left as it is (freed tensor memory may stay in the heap)")
        return False
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        log.warning("glibc refused M_MMAP_THRESHOLD=%d: freed tensor memory may stay in the process heap", threshold)
        return False
    log.info("set glibc's M_MMAP_THRESHOLD to %d bytes for this process: memory of tensors read from files goes back to "
             "the OS when freed", threshold)
    return True


class LazyTensors:
    """Tensor-by-tensor reads from a validated safetensors file (``with`` or ``close()``).

    Each ``get`` reads one tensor into its own memory with a plain file read (no memory map): a
    mapped file keeps every page it touched in the process's resident set, so streaming a 16 GB
    checkpoint through a map would count 16 GB; this way memory is what the caller keeps. Opening
    one sets the process's malloc mmap threshold once (return_freed_memory_to_os, logged).
    """

    def __init__(self, path: str | Path):
        self.header = read_header(path)
        return_freed_memory_to_os()
        with os_errors(self.header.path, "read", ModelLoadError):
            self._file = open(self.header.path, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self):
        return self.header.tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        import torch

        info = self._info(name)
        data = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            self._read_into(name, info, memoryview(data.numpy()))
        return data.view(info.dtype).reshape(info.shape)

    def read_bytes(self, name: str) -> bytes:
        """A tensor's raw bytes (no torch: for small entries read on header-only paths)."""
        info = self._info(name)
        data = bytearray(info.nbytes)
        if info.nbytes:
            self._read_into(name, info, memoryview(data))
        return bytes(data)

    def _info(self, name: str) -> TensorInfo:
        info = self.header.tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{self.header.path}: missing tensor {name!r}")
        return info

    def _read_into(self, name: str, info: TensorInfo, buffer: memoryview) -> None:
        with os_errors(self.header.path, "read", ModelLoadError):
            self._file.seek(self.header.data_start + info.offsets[0])
            got = self._file.readinto(buffer)
        if got != info.nbytes:
            raise ModelLoadError(f"{self.header.path}: truncated while reading tensor {name!r}")
