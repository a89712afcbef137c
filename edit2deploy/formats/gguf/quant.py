"""Encoding tensors into GGUF types.

- `encode(array, qtype)`: F32/F16 in numpy, BF16 and the legacy block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) with
  `gguf.quants.quantize`; K-quants (no numpy encoder exists) with llama.cpp's own `ggml_quantize_chunk`.
- `llama_quantize(src, dst, file_type)`: a whole file through `llama_cpp.llama_model_quantize` (K-quant mixes).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from edit2deploy.errors import Edit2DeployError, UsageError

NUMPY_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1})


def require_llama_cpp():
    """`llama_cpp`, or a clear error saying how to get it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise UsageError(
            "this needs llama-cpp-python: pip install 'edit2deploy[gguf]' (it builds llama.cpp from source; "
            "on AMX CPUs use CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON')"
        ) from exc
    return llama_cpp


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect the process's stderr (fd 2: llama.cpp prints there directly) into a list of lines."""
    import sys
    import tempfile

    lines: list[str] = []
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", errors="replace").splitlines())


@contextlib.contextmanager
def quiet_llama() -> Iterator[None]:
    """Silence llama.cpp's log output (llama-cpp-python routes it through its 'llama-cpp-python' logger)."""
    require_llama_cpp()
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_GGML = None


def _ggml():
    """libggml-base from the llama-cpp-python install, with the quantization entry points typed."""
    global _GGML
    if _GGML is None:
        llama_cpp = require_llama_cpp()
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        names = ["libggml-base.so", "libggml-base.dylib", "ggml-base.dll"]
        path = next((lib_dir / n for n in names if (lib_dir / n).exists()), None)
        if path is None:
            raise Edit2DeployError(f"libggml-base not found in {lib_dir}")
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        _GGML = lib
    return _GGML


def ggml_encode(data: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantize a float32 array (rows = last axis) with llama.cpp's own kernels (no importance matrix)."""
    lib = _ggml()
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise UsageError(f"{qtype.name} needs an importance matrix; not supported")
    src = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = src.shape[-1]
    nrows = src.size // n_per_row
    byte_shape = gguf.quant_shape_to_byte_shape(src.shape, qtype)
    dst = np.empty(byte_shape, dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, dst.ctypes.data, 0, nrows, n_per_row, None)
    if written != dst.nbytes:
        raise Edit2DeployError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst


def encode(data: np.ndarray, qtype: QT) -> np.ndarray:
    """A float32 array stored as `qtype`: float arrays for F32/F16, uint8 bytes for block types."""
    if qtype == QT.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == QT.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    if qtype in NUMPY_TYPES:
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
    return ggml_encode(data, qtype)


def llama_quantize(src: Path, dst: Path, file_type: int, threads: int | None = None) -> list[str]:
    """`llama_model_quantize(src -> dst)` at a llama_ftype (llama.cpp picks each tensor's type).

    llama.cpp's messages (e.g. "ncols 576 not divisible by 256 ... falling back to q5_0") are returned, not printed.
    """
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = threads or os.cpu_count() or 1
    with quiet_llama(), captured_stderr() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        tail = "\n".join(log[-5:])
        raise Edit2DeployError(f"llama_model_quantize failed (code {rc}) on {src}:\n{tail}")
    return log
