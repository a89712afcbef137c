"""GGUF export speed: our full export and our patch export vs llama.cpp's own converter + quantizer.

    python benchmarks/export_speed.py --convert /path/to/llama.cpp/convert_hf_to_gguf.py

llama.cpp's converter is not a dependency of this project. It ships in llama-cpp-python's source archive:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/x
    tar xzf /tmp/x/llama_cpp_python-0.3.36.tar.gz -C /tmp/x
    # -> /tmp/x/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py (needs torch, sentencepiece)

The model (default: the built-in SmolLM2-135M) is copied with `--layers` MLP down-projections slightly changed
and an edit ledger naming them, i.e. what an edit leaves behind. For each type:
- llama.cpp: `convert_hf_to_gguf.py --outtype f16|bf16|q8_0|f32` (a subprocess, as people run it); for the
  other types `--outtype f16` then `llama_model_quantize` (what `llama-quantize` does);
- ours (full): `FORMATS["gguf"].export(model_dir, out, type)` (edited tensors protected at >= Q8_0);
- ours (patch): only the edited tensors replaced in llama.cpp's file of the same type (`patch_base=`).
A last row patches the wheel's own Q4_1 file (the case where the model came as a GGUF).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONVERTER_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


def make_edited_copy(src: Path, dst: Path, layers: list[int]) -> list[str]:
    """A copy of `src` whose MLP down-projections in `layers` are slightly changed, with a ledger state."""
    from edit2deploy.arch import architecture_for
    from edit2deploy.models import read_config
    from edit2deploy.synthetic import perturbed_copy

    arch = architecture_for(read_config(src)["model_type"])
    names = [arch.weight_name(i) for i in layers]
    perturbed_copy(src, dst, names, base_model=str(src), seed=0)
    return names


def run_converter(converter: Path, model_dir: Path, outtype: str, out: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(converter), str(model_dir), "--outtype", outtype, "--outfile", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def converter_startup(converter: Path) -> float:
    """Seconds `convert_hf_to_gguf.py --help` takes: its Python start-up and imports (torch, gguf-py)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(converter), "--help"], capture_output=True, check=False)
    return time.perf_counter() - t0


def llama_cpp_export(converter: Path, model_dir: Path, quant: str, out: Path, threads: int | None) -> float:
    from edit2deploy.formats.gguf.constants import quant_spec
    from edit2deploy.formats.gguf.quant import llama_quantize

    if quant in CONVERTER_TYPES:
        return run_converter(converter, model_dir, CONVERTER_TYPES[quant], out)
    f16 = out.with_suffix(".f16.gguf")
    seconds = run_converter(converter, model_dir, "f16", f16)
    t0 = time.perf_counter()
    llama_quantize(f16, out, quant_spec(quant).file_type, threads)
    seconds += time.perf_counter() - t0
    f16.unlink()
    return seconds


def mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--convert", type=Path, help="path to llama.cpp's convert_hf_to_gguf.py (see above)")
    ap.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf, or built-in name")
    ap.add_argument("--quants", default="F16,Q8_0,Q4_K_M", help="comma list of GGUF types")
    ap.add_argument("--layers", default="4,5,6,7,8", help="edited layers (default: 5 of SmolLM2's 30)")
    ap.add_argument("--threads", type=int, default=None, help="llama_model_quantize threads (default: all)")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where to write (default: a temp dir, removed)"
    )
    args = ap.parse_args(argv)

    if args.convert is None or not args.convert.is_file():
        print(__doc__, file=sys.stderr)
        print("error: --convert must name llama.cpp's convert_hf_to_gguf.py", file=sys.stderr)
        return 2
    if importlib.util.find_spec("sentencepiece") is None:
        print(
            "note: llama.cpp's converter imports sentencepiece for llama-family models: pip install sentencepiece"
        )

    from edit2deploy.formats import FORMATS
    from edit2deploy.models import resolve_model_dir, source_gguf

    gguf = FORMATS["gguf"]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="e2d-export-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = resolve_model_dir(args.model)
        edited_dir = work / "edited"
        if edited_dir.exists():
            shutil.rmtree(edited_dir)
        layers = [int(x) for x in args.layers.split(",")]
        names = make_edited_copy(src, edited_dir, layers)
        print(f"model: {args.model} ({src}), edited: {len(names)} tensors (layers {args.layers})\n")

        startup = converter_startup(args.convert)
        rows = []
        for quant in [q.strip().upper() for q in args.quants.split(",") if q.strip()]:
            ref = work / f"llamacpp-{quant}.gguf"
            t_ref = llama_cpp_export(args.convert, edited_dir, quant, ref, args.threads)
            ours = work / f"ours-{quant}.gguf"
            art = gguf.export(edited_dir, ours, quant, threads=args.threads)
            patched = work / f"patch-{quant}.gguf"
            part = gguf.export(edited_dir, patched, None, patch_base=ref)
            net = t_ref - startup
            rows.append(
                [quant, f"{t_ref:.2f}", f"{net:.2f}", f"{art.seconds:.2f}", f"{part.seconds:.2f}",
                 f"{net / art.seconds:.1f}x", f"{net / part.seconds:.0f}x",
                 mb(ref), mb(ours), mb(patched)]
            )  # fmt: skip
        wheel = source_gguf(args.model)
        if wheel is not None:
            patched = work / "patch-source.gguf"
            part = gguf.export(edited_dir, patched, None, patch_base=wheel)
            rows.append(
                [
                    f"{part.quant} (source .gguf)",
                    "-",
                    "-",
                    "-",
                    f"{part.seconds:.2f}",
                    "-",
                    "-",
                    mb(wheel),
                    "-",
                    mb(patched),
                ]
            )

        headers = ["type", "llama.cpp s", "llama.cpp net s", "ours full s", "ours patch s", "full speedup",
                   "patch speedup", "llama.cpp MB", "ours MB", "patch MB"]  # fmt: skip
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        print(
            f"\nllama.cpp s = convert_hf_to_gguf.py as a subprocess [+ llama_model_quantize from its F16 output];"
            f" net = minus the converter's start-up ({startup:.2f} s: Python, torch and gguf-py imports, measured"
            " with --help), since ours is timed in-process; speedups = net / ours."
            "\nours patch = only the edited tensors re-encoded, every other tensor and all metadata copied from"
            " llama.cpp's file of the same type (or from the model's source .gguf)."
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
