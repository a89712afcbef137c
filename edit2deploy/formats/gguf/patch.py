"""Patch mode: a new GGUF in which only some tensors differ from a base GGUF.

The header and every metadata key/value are copied byte for byte; tensor-info entries are copied except the
type and offset of replaced tensors; every other tensor's bytes are copied unchanged. Cost scales with the size
of the file copy plus the replaced tensors, not with re-encoding the model.

`scan(path)` is a small GGUF header parser (gguf's `GGUFReader` decodes every token string into numpy fields,
~2 s for a 49k-token vocabulary; this skips over them).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from edit2deploy.errors import UsageError

_SCALAR = {
    VT.UINT8: "B",
    VT.INT8: "b",
    VT.UINT16: "H",
    VT.INT16: "h",
    VT.UINT32: "I",
    VT.INT32: "i",
    VT.FLOAT32: "f",
    VT.BOOL: "?",
    VT.UINT64: "Q",
    VT.INT64: "q",
    VT.FLOAT64: "d",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor-info entry of a GGUF."""

    name: str
    dims: tuple[int, ...]  # ggml order (ne0 = row length)
    qtype: QT
    offset: int  # relative to the data section

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy (row-major) shape."""
        return tuple(reversed(self.dims))

    @property
    def n_bytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = 1
        for d in self.dims:
            n *= d
        return n // block * type_size


@dataclass
class GGUFLayout:
    """Where things are in a GGUF file."""

    path: Path
    version: int
    kv_end: int  # end of the header + key/value section (= start of the tensor infos)
    data_start: int  # absolute offset of the tensor data section
    alignment: int
    tensors: list[TensorEntry]
    values: dict[str, Any] = field(default_factory=dict)  # scalar and string metadata (arrays skipped)

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def is_gguf(path: Path | str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def scan(path: Path | str) -> GGUFLayout:
    """Parse a GGUF's header, metadata and tensor infos (little-endian, version 2/3)."""
    path = Path(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise UsageError(f"{path}: not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise UsageError(f"{path}: GGUF version {version} is not supported")
        pos = 24
        values: dict[str, Any] = {}

        def read_str(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", mm, p)
            return mm[p + 8 : p + 8 + n].decode("utf-8", errors="replace"), p + 8 + n

        def skip_value(vt: int, p: int) -> tuple[Any, int]:
            if vt in _SCALAR:
                fmt = "<" + _SCALAR[VT(vt)]
                return struct.unpack_from(fmt, mm, p)[0], p + struct.calcsize(fmt)
            if vt == VT.STRING:
                return read_str(p)
            if vt == VT.ARRAY:
                (sub, count) = struct.unpack_from("<IQ", mm, p)
                p += 12
                if sub in _SCALAR:
                    return None, p + count * struct.calcsize("<" + _SCALAR[VT(sub)])
                for _ in range(count):
                    _, p = skip_value(sub, p)
                return None, p
            raise UsageError(f"{path}: unknown GGUF value type {vt}")

        for _ in range(n_kv):
            key, pos = read_str(pos)
            (vt,) = struct.unpack_from("<I", mm, pos)
            value, pos = skip_value(vt, pos + 4)
            if value is not None:
                values[key] = value
        kv_end = pos
        tensors = []
        for _ in range(n_tensors):
            name, pos = read_str(pos)
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            pos += 4 + 8 * n_dims
            qtype, offset = struct.unpack_from("<IQ", mm, pos)
            pos += 12
            tensors.append(TensorEntry(name, tuple(int(d) for d in dims), QT(qtype), int(offset)))
    alignment = int(values.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = _pad(pos, alignment)
    return GGUFLayout(path, version, kv_end, data_start, alignment, tensors, values)


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _write_all(dst, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = dst.write(view)
        view = view[n:]


def _read_at(src, offset: int, n: int) -> bytes:
    src.seek(offset)
    data = src.read(n)
    if len(data) != n:
        raise UsageError(f"{src.name}: truncated GGUF (wanted {n} bytes at {offset})")
    return data


def _copy_range(src, dst, offset: int, n: int) -> None:
    """Append `n` bytes of `src` from `offset` to `dst` (in-kernel copy where the OS has one)."""
    copied = 0
    if hasattr(os, "copy_file_range"):
        try:
            while copied < n:
                k = os.copy_file_range(src.fileno(), dst.fileno(), n - copied, offset + copied)
                if k == 0:
                    break
                copied += k
        except OSError:
            pass  # e.g. across filesystems on old kernels: fall back to read/write
    chunk = 1 << 24
    while copied < n:
        k = min(chunk, n - copied)
        _write_all(dst, _read_at(src, offset + copied, k))
        copied += k


@dataclass(frozen=True)
class Replacement:
    """New content for one tensor: encoded bytes (or a float array) at `qtype`."""

    data: np.ndarray
    qtype: QT


def rewrite(base: GGUFLayout, out: Path, replacements: dict[str, Replacement]) -> dict[str, QT]:
    """Write `base` to `out` with the tensors named in `replacements` swapped; returns each tensor's final type."""
    unknown = sorted(set(replacements) - {t.name for t in base.tensors})
    if unknown:
        raise UsageError(f"{base.path}: no tensor named {', '.join(unknown)} (is it the same model family?)")
    entries: list[TensorEntry] = []
    offset = 0
    for t in base.tensors:
        qtype = replacements[t.name].qtype if t.name in replacements else t.qtype
        entry = TensorEntry(t.name, t.dims, qtype, offset)
        if t.name in replacements and replacements[t.name].data.nbytes != entry.n_bytes:
            raise ValueError(f"{t.name}: {replacements[t.name].data.nbytes} bytes for {qtype.name}{t.dims}")
        entries.append(entry)
        offset = _pad(offset + entry.n_bytes, base.alignment)

    info = bytearray()
    for e in entries:
        raw = e.name.encode("utf-8")
        info += struct.pack("<Q", len(raw)) + raw
        info += struct.pack(f"<I{len(e.dims)}Q", len(e.dims), *e.dims)
        info += struct.pack("<IQ", int(e.qtype), e.offset)

    with open(base.path, "rb") as src, open(out, "wb", buffering=0) as dst:
        _write_all(dst, _read_at(src, 0, base.kv_end))
        _write_all(dst, bytes(info))
        data_start = _pad(base.kv_end + len(info), base.alignment)
        _write_all(dst, b"\0" * (data_start - dst.tell()))
        for old, new in zip(base.tensors, entries, strict=True):
            assert dst.tell() == data_start + new.offset
            if old.name in replacements:
                _write_all(dst, np.ascontiguousarray(replacements[old.name].data).tobytes())
            else:
                _copy_range(src, dst, base.data_start + old.offset, old.n_bytes)
            _write_all(dst, b"\0" * (_pad(new.n_bytes, base.alignment) - new.n_bytes))
    return {e.name: e.qtype for e in entries}
