"""Writing a GGUF file (version 3, little-endian), the layout gguf_reader.py reads.

Header: magic "GGUF", version, tensor count, metadata count; each metadata entry (key, value type,
value: arrays carry an element type and a count); each tensor's name, dims (innermost first), type
and offset from the start of the data; padding to `general.alignment`; then each tensor's bytes,
each starting on an aligned offset. Metadata keeps the value types it is given (a source file's
types come from GGUFReader.field_types), so a rewritten file carries its source's fields unchanged.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kvserve.loader.gguf_reader import _ARRAY, _SCALARS, _STRING, DEFAULT_ALIGNMENT, MAGIC

UINT32, INT32, FLOAT32, BOOL, STRING = 4, 5, 6, 7, _STRING


def _guess_type(value: Any) -> tuple[int, int | None]:
    if isinstance(value, bool):
        return BOOL, None
    if isinstance(value, int):
        return (UINT32 if 0 <= value < 2**32 else 11), None
    if isinstance(value, float):
        return FLOAT32, None
    if isinstance(value, str):
        return STRING, None
    if isinstance(value, (list, tuple)) and value:
        return _ARRAY, _guess_type(value[0])[0]
    raise ValueError(f"cannot infer a GGUF type for {value!r}")


class GGUFWriter:
    """Collect metadata and tensors, then `write()` them to `path` in one pass."""

    def __init__(self, path: str | Path, alignment: int = DEFAULT_ALIGNMENT) -> None:
        self.path = Path(path)
        self.alignment = alignment
        self.fields: dict[str, tuple[int, int | None, Any]] = {}
        self.tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType, np.ndarray]] = []

    def add_field(self, key: str, value: Any, vtype: int | None = None, etype: int | None = None) -> None:
        if vtype is None:
            vtype, etype = _guess_type(value)
        if vtype == _ARRAY and etype == _ARRAY:
            raise ValueError(f"{key}: nested arrays are not supported")
        self.fields[key] = (vtype, etype, value)

    def add_tensor(self, name: str, shape: tuple[int, ...], qtype: str, data: np.ndarray) -> None:
        """`shape` row-major in elements; `data` the tensor's elements (F32/F16) or its block bytes."""
        t = GGMLQuantizationType[qtype]
        block, type_size = GGML_QUANT_SIZES[t]
        n = int(np.prod(shape)) if shape else 1
        if shape and shape[-1] % block:
            raise ValueError(f"{name}: a row of {shape[-1]} is not whole blocks of {block}")
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != n // block * type_size:
            raise ValueError(f"{name}: {raw.size} bytes for {qtype} {shape} (expected {n // block * type_size})")
        self.tensors.append((name, tuple(int(s) for s in shape), t, raw))

    # -- encoding ---------------------------------------------------------------------------------

    @staticmethod
    def _str(s: str) -> bytes:
        b = s.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def _value(self, vtype: int, value: Any, etype: int | None) -> bytes:
        if vtype in _SCALARS:
            return struct.pack("<" + _SCALARS[vtype][0], value)
        if vtype == _STRING:
            return self._str(value)
        if vtype != _ARRAY or etype is None:
            raise ValueError(f"unknown metadata value type {vtype}")
        head = struct.pack("<IQ", etype, len(value))
        if etype in _SCALARS:
            return head + np.asarray(value, dtype=np.dtype(_SCALARS[etype][1]).newbyteorder("<")).tobytes()
        if etype == _STRING:
            return head + b"".join(self._str(v) for v in value)
        raise ValueError(f"unknown array element type {etype}")

    def write(self) -> None:
        align = self.alignment
        fields = dict(self.fields)
        if align != DEFAULT_ALIGNMENT:
            fields["general.alignment"] = (UINT32, None, align)
        else:
            fields.pop("general.alignment", None)
        out = bytearray(MAGIC + struct.pack("<IQQ", 3, len(self.tensors), len(fields)))
        for key, (vtype, etype, value) in fields.items():
            out += self._str(key) + struct.pack("<I", vtype) + self._value(vtype, value, etype)
        offset = 0
        offsets = []
        for name, shape, t, raw in self.tensors:
            offsets.append(offset)
            dims = tuple(reversed(shape)) or (1,)
            out += self._str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            out += struct.pack("<IQ", int(t), offset)
            offset += -(-raw.size // align) * align
        out += b"\0" * (-len(out) % align)
        tmp = self.path.with_name(self.path.name + ".part")
        with open(tmp, "wb") as f:
            f.write(out)
            for (_, _, _, raw), off in zip(self.tensors, offsets):
                f.write(raw.tobytes())
                f.write(b"\0" * (-raw.size % align))
        tmp.replace(self.path)  # a reader never sees a half-written file
