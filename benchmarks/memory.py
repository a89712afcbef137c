"""Peak memory and time of the whole chain on synthetic Llama models: float32 weights (before) vs the checkpoint's bf16.

The benchmark makes its own models: Llama architecture, SmolLM2's tokenizer, random weights (seed 0), saved in
bf16. For each size and each weights precision it runs, in a fresh process so each peak is that run's own,
`edit2deploy.run` with statistics on WikiText-2 (`--n-tokens`), `--n` CounterFact edits in one batch, a GGUF Q4_K_M
export and its verification in llama.cpp (no paired baseline, no generated-text probes: the chain's memory is under
test, not the quality of edits to a random model). Each run has a cache of its own (`EDIT2DEPLOY_CACHE`), so its
statistics and scores are computed in it. Peak resident memory per stage comes from the run's report; the edit
stage's is the largest of its ledger's (load, statistics, batch), also shown apart.

    cd benchmarks && python memory.py                                  # 0.5B and 1.5B, float32 and bf16
    cd benchmarks && python memory.py --sizes 0.5b --n-tokens 5000     # a quicker look

Target (issue 30): the bf16 path's peak ≤ 1.3 × the bf16 checkpoint + the edited layers in float32 + 1 GiB, and
≤ 0.6 × the float32 path's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import COUNTERFACT, WIKITEXT, machine, print_table, write_json

# name: (hidden, intermediate, layers, heads, kv heads)
SIZES = {
    "0.5b": (1024, 4096, 24, 16, 4),
    "1.5b": (2048, 5632, 28, 16, 4),
    "8b": (4096, 14336, 32, 32, 8),  # Llama-3-8B's shape with SmolLM2's vocabulary (gpu.sh)
}


def make_model(size: str, root: Path, tokenizer: str | None = None, device: str = "cpu") -> Path:
    """A random-weights Llama of `size`, saved in bf16 with SmolLM2's tokenizer (from `tokenizer`, a directory,
    when given), made on `device` (once; reused after)."""
    out = root / f"synthetic-llama-{size}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if tokenizer is None:
        from edit2deploy.models import resolve_model_dir

        tokenizer = str(resolve_model_dir("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(tokenizer)
    hidden, ffn, layers, heads, kv = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def one_run(model: Path, dtype: str, out: Path, n: int, n_tokens: int) -> dict:
    """The chain in this process (called in a child): seconds and the report's peaks."""
    import edit2deploy
    from edit2deploy.requests import load_requests

    requests = load_requests(COUNTERFACT / "counterfact-val.json", limit=n)
    t = time.perf_counter()
    res = edit2deploy.run(
        str(model),
        requests,
        "gguf:Q4_K_M",
        out,
        corpus=WIKITEXT,
        n_tokens=n_tokens,
        dtype=dtype,
        baseline=False,
        generation=False,
        gates={"survival": None, "specificity_drop": None},
        quiet=True,
    )
    doc = json.loads(res.reports["json"].read_text())
    ledger = next((r["peak_rss_mib"] for r in res.ledger_records if "peak_rss_mib" in r), {})
    return {
        "seconds": time.perf_counter() - t,
        "timings": doc["timings"],
        "memory": doc["memory"],
        "ledger": ledger,
    }


def _gib(mib: float) -> str:
    return f"{mib / 1024:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--dtypes", default="float32,auto", help="auto: the checkpoint's bf16")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--n-tokens", type=int, default=20_000)
    ap.add_argument("--root", default="out/memory")
    ap.add_argument("--json", default=None)
    ap.add_argument("--fresh", action="store_true", help="measure again what an earlier run already measured")
    ap.add_argument("--make", default=None, metavar="SIZE", help="only make the SIZE model under --root")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the built-in SmolLM2's)")
    ap.add_argument("--device", default="cpu", help="where --make builds the random weights")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "DTYPE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        model, dtype, out = args.child
        print(json.dumps(one_run(Path(model), dtype, Path(out), args.n, args.n_tokens)))
        return
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.make:
        print(make_model(args.make, root, args.tokenizer, args.device))
        return
    rows, doc = [], {"machine": machine(), "n": args.n, "n_tokens": args.n_tokens, "runs": {}}
    for size in args.sizes.split(","):
        model = make_model(size, root)
        ckpt_mib = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        hidden, ffn, layers, _, _ = SIZES[size]
        from edit2deploy.arch import ARCHITECTURES

        edited_mib = len(ARCHITECTURES["llama"].layers_for(layers)) * hidden * ffn * 4 / 2**20
        target = 1.3 * ckpt_mib + edited_mib + 1024
        peaks = {}
        for dtype in args.dtypes.split(","):
            out = root / f"run-{size}-{dtype}"
            done = out / "measured.json"  # a finished measurement with these settings is read, not repeated
            r = json.loads(done.read_text()) if done.is_file() and not args.fresh else None
            if r is None or (r.get("n"), r.get("n_tokens")) != (args.n, args.n_tokens):
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, __file__, "--n", str(args.n), "--n-tokens", str(args.n_tokens), "--child",
                       str(model), dtype, str(out)]  # fmt: skip
                with (
                    tempfile.TemporaryDirectory() as cache
                ):  # statistics and scores computed in the run itself
                    env = {**os.environ, "EDIT2DEPLOY_CACHE": cache}
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{size} {dtype} failed:\n{proc.stderr[-3000:]}")
                r = {
                    **json.loads(proc.stdout.strip().splitlines()[-1]),
                    "n": args.n,
                    "n_tokens": args.n_tokens,
                }
                done.write_text(json.dumps(r))
            stages = r["memory"]["peak_rss_mib"]
            peaks[dtype] = max(stages.values())
            doc["runs"][f"{size}-{dtype}"] = {**r, "checkpoint_mib": ckpt_mib, "target_mib": target}
            rows.append(
                [size, "float32 (before)" if dtype == "float32" else f"{dtype} (bf16 checkpoint)",
                 _gib(ckpt_mib), *(_gib(r.get("ledger", {}).get(k, 0)) for k in ("statistics", "batch")),
                 *(_gib(stages.get(k, 0)) for k in ("edit", "export gguf:Q4_K_M", "reference",
                 "verify gguf:Q4_K_M")), _gib(peaks[dtype]), _gib(target),
                 "-" if dtype == "float32" or "float32" not in peaks else f"{peaks[dtype] / peaks['float32']:.2f}",
                 f"{r['timings'].get('edit', 0):.0f}", f"{r['seconds']:.0f}"]
            )  # fmt: skip
    print(f"\n{args.n} edits, statistics on {args.n_tokens:,} tokens, GGUF Q4_K_M; {machine()}")
    print_table(
        ["model", "weights", "checkpoint GiB", "statistics GiB", "batch GiB", "edit GiB", "export GiB",
         "reference GiB", "verify GiB",
         "peak GiB", "target GiB", "peak / float32", "edit s", "total s"],
        rows,
    )  # fmt: skip
    write_json(args.json, doc)


if __name__ == "__main__":
    main()
