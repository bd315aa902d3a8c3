"""Reading a GGUF file's header: metadata as plain Python values, tensors as views of one mapping.

The layout (little-endian): magic "GGUF", version (2 or 3), tensor count, metadata count; then each
metadata entry (key string, value type, value; arrays carry an element type and a count); then
each tensor's name, dims (innermost first), type and offset; then the data, aligned to
`general.alignment` (default 32). Strings are a uint64 length and UTF-8 bytes.

A vocabulary is ~10^5 strings: they are sliced straight out of the mapping into one list, and
numeric arrays are one np.frombuffer each, so parsing SmolLM2's header takes ~0.1 s and a few MB
(a general-purpose reader that keeps a numpy view per field element takes over a second and
~75 MB for the same file).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types -> (struct code, numpy dtype); 8 string and 9 array are read apart
_SCALARS: dict[int, tuple[str, Any]] = {
    0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
    5: ("i", np.int32), 6: ("f", np.float32), 7: ("?", np.bool_), 10: ("Q", np.uint64), 11: ("q", np.int64),
    12: ("d", np.float64),
}
_STRING, _ARRAY = 8, 9
# tensor types stored as plain elements (the rest are blocks of bytes)
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}


class GGUFFormatError(ValueError):
    """The bytes are not a well-formed GGUF file (truncated, corrupt or an unsupported version)."""


@dataclass
class TensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dims as stored, innermost first (reverse for the row-major shape)
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file
    data: np.ndarray  # read-only view of the mapping: elements, or [rows..., bytes per row] for block types


class GGUFReader:
    """Parses a GGUF file's metadata and tensor table; keeps the file mapped for the tensors' data."""

    def __init__(self, path: str | Path) -> None:
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = memoryview(self.mm)
        self.pos = 0
        if self._bytes(4) != MAGIC:
            raise GGUFFormatError("bad magic bytes")
        self.version = self._scalar("I")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            kind = "a big-endian GGUF" if swapped in (2, 3) else f"GGUF version {self.version}"
            raise GGUFFormatError(f"{kind} is not supported")
        n_tensors, n_kv = self._scalar("Q"), self._scalar("Q")
        if n_tensors > len(self.mm) or n_kv > len(self.mm):
            raise GGUFFormatError("corrupt header counts")
        self.fields: dict[str, Any] = {}
        # key -> (value type, array element type or None): what a writer needs to keep a field as it was
        self.field_types: dict[str, tuple[int, int | None]] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._scalar("I")
            etype = None
            if vtype == _ARRAY:
                self._need(4)
                (etype,) = struct.unpack_from("<I", self.mm, self.pos)
            self.field_types[key] = (vtype, etype)
            self.fields[key] = self._value(vtype)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        align = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0:
            raise GGUFFormatError(f"bad general.alignment {align!r}")
        start = -(-self.pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise GGUFFormatError("duplicated tensor names")

    # -- primitive reads --------------------------------------------------------------------------

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.mm):
            raise GGUFFormatError(f"truncated at byte {self.pos} (needs {n} more)")

    def _bytes(self, n: int) -> bytes:
        self._need(n)
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def _scalar(self, code: str) -> Any:
        size = struct.calcsize("<" + code)
        self._need(size)
        (v,) = struct.unpack_from("<" + code, self.mm, self.pos)
        self.pos += size
        return v

    def _string(self) -> str:
        n = self._scalar("Q")
        try:
            return self._bytes(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"a string that is not UTF-8 at byte {self.pos}") from e

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            v = self._scalar(_SCALARS[vtype][0])
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise GGUFFormatError(f"unknown metadata value type {vtype}")
        etype, count = self._scalar("I"), self._scalar("Q")
        if etype in _SCALARS:
            dtype = np.dtype(_SCALARS[etype][1]).newbyteorder("<")
            self._need(count * dtype.itemsize)
            arr = np.frombuffer(self.mm, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        if etype == _STRING:
            return self._strings(count)
        if etype == _ARRAY:
            return [self._value(_ARRAY) for _ in range(count)]
        raise GGUFFormatError(f"unknown array element type {etype}")

    def _strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary): one pass over the mapping, no per-string views."""
        mm, pos, end, out = self.mm, self.pos, len(self.mm), []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(count):
                if pos + 8 > end:
                    raise GGUFFormatError(f"truncated string array at byte {pos}")
                (n,) = unpack(mm, pos)
                if pos + 8 + n > end:
                    raise GGUFFormatError(f"truncated string array at byte {pos}")
                out.append(mm[pos + 8 : pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"a string that is not UTF-8 near byte {pos}") from e
        self.pos = pos
        return out

    # -- tensors ----------------------------------------------------------------------------------

    def _tensor_info(self) -> tuple[str, np.ndarray, int, int]:
        name = self._string()
        n_dims = self._scalar("I")
        if n_dims > 8:
            raise GGUFFormatError(f"tensor {name}: {n_dims} dims")
        dims = np.array([self._scalar("Q") for _ in range(n_dims)], dtype=np.uint64)
        return name, dims, self._scalar("I"), self._scalar("Q")

    def _tensor(self, start: int, name: str, dims: np.ndarray, raw_type: int, offset: int) -> TensorInfo:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFFormatError(f"tensor {name}: unknown type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elements = int(np.prod(dims, dtype=np.uint64)) if len(dims) else 1
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        if shape and shape[-1] % block:
            raise GGUFFormatError(f"tensor {name}: row of {shape[-1]} is not whole blocks of {block}")
        n_bytes = n_elements // block * type_size
        data_offset = start + offset
        if data_offset + n_bytes > len(self.mm):
            raise GGUFFormatError(f"truncated: tensor {name} extends past the end of the file")
        dtype = _ELEMENT_DTYPES.get(qtype.name)
        if dtype is not None:
            data = np.frombuffer(self.mm, dtype=dtype, count=n_elements, offset=data_offset).reshape(shape)
        else:  # block formats: rows of bytes
            rows = shape[:-1] + (shape[-1] // block * type_size,) if shape else (n_bytes,)
            data = np.frombuffer(self.mm, dtype=np.uint8, count=n_bytes, offset=data_offset).reshape(rows)
        return TensorInfo(name, qtype, dims, n_elements, n_bytes, data_offset, data)
