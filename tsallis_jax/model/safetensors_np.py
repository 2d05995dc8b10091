"""Minimal safetensors reading and writing with numpy, including bfloat16 (which `safetensors.numpy` rejects).

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the raw little-endian
bytes. Reading memory-maps the file, so a tensor costs nothing until it is touched: loaders stay lazy, tensor by
tensor. Qwen3 checkpoints are stored in bfloat16.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
  "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
  "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
  "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsFile:
  """A memory-mapped safetensors file: `keys()`, `shape(name)`, `get(name)` (a read-only numpy view)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    with open(self.path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(header_len))
    self.metadata = header.pop("__metadata__", {}) or {}
    self._header = header
    self._data_start = 8 + header_len
    self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

  def keys(self) -> list[str]:
    return list(self._header)

  def __contains__(self, name: str) -> bool:
    return name in self._header

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    entry = self._header[name]
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"Tensor {name!r} in {self.path} has dtype {entry['dtype']}, which this reader does not "
                       f"handle; supported: {sorted(_DTYPES)}.")
    begin, end = entry["data_offsets"]
    raw = self._map[self._data_start + begin:self._data_start + end]
    return raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def save(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
         ) -> None:
  """Writes `tensors` as a safetensors file (names sorted, header padded to 8 bytes, as the reference writer does)."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _NAMES:
      raise ValueError(f"Tensor {name!r} has dtype {array.dtype}, which safetensors cannot store here.")
    array = array.astype(dtype, copy=False)
    header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays:
      f.write(array.tobytes())
