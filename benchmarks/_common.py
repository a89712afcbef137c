"""Shared helpers for the benchmarks (not tests): data paths, evaluation, table printing."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import tomllib
from pathlib import Path
from typing import Self

import torch

from edit2deploy.memory import peak_rss_mib, process_peak_mib, reset_peak_rss

ROOT = Path(__file__).resolve().parents[1]
# the shared data beside the checkout; EDIT2DEPLOY_BENCH_DATA: a copy of it elsewhere (gpu.sh carries one)
DATA = Path(os.environ.get("EDIT2DEPLOY_BENCH_DATA") or ROOT.parent / "shared" / "data")
COUNTERFACT = DATA / "counterfact"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


def speed_variants(base):
    """The z-optimisation variants the speed benchmarks compare, each an `EditConfig` derived from `base`."""
    from dataclasses import replace

    v = base.values
    return {
        "batched": base,
        "one-at-a-time": replace(base, values=replace(v, group=1)),
        # One request at a time over whole rows: the reference's procedure minus our lower-block replay and
        # scored-positions-only head, so a conservative (fast) stand-in for it.
        "one-at-a-time-whole-rows": replace(base, values=replace(v, group=1, prefix_cache=False)),
        "batched-whole-rows": replace(base, values=replace(v, prefix_cache=False)),
        # AlphaEdit's own stop (ROME's loss threshold) instead of MPES: the MPES saving, side by side.
        "no-mpes": replace(base, method="alphaedit"),
        # The same engine with torch's stock matmuls (MKL's sgemm in float32; autocast where bf16 is chosen)
        # instead of oneDNN's packed linears.
        "batched-stock-matmul": replace(base, values=replace(v, onednn=False)),
        # float32 even where the CPU multiplies bf16 natively (AMX): what the bf16-packed linears buy.
        "batched-fp32": replace(base, values=replace(v, dtype="float32")),
    }


def variant_result(name: str, run, seconds: float, lm, requests) -> dict:
    """One speed variant's record: edits/s, time per phase (keys, z, solve; summed over the ledger's batch
    records), mean z steps, and ES / PS / NS of the edited model."""
    steps = [s for b in run.batches for s in b["steps"]]
    return {
        "variant": name,
        "edits": len(requests),
        "seconds": seconds,
        "s_per_edit": seconds / len(requests),
        "edits_per_s": len(requests) / seconds,
        "phases": {k: sum(b["timings"][k] for b in run.batches) for k in ("keys", "z", "solve")},
        "mean_steps": sum(steps) / len(steps),
        **rates_of(lm, requests),
    }


def print_variants(results: list[dict], memory: str | None = None) -> None:
    """The variants' table (with a peak-memory column `memory` when given: a formatted "memory" entry per
    record), then the first variant's edits/s and z-time ratio to each other."""
    heads = ["variant", "edits", "s/edit", "edits/s", "keys s", "z s", "solve s", "mean z steps"]
    rows = []
    for r in results:
        row = [r["variant"], r["edits"], f"{r['s_per_edit']:.2f}", f"{r['edits_per_s']:.3f}"]
        row += [f"{r['phases'][k]:.1f}" for k in ("keys", "z", "solve")] + [f"{r['mean_steps']:.1f}"]
        row += [r["memory"]] if memory else []
        rows.append(row + [f"{r[k]:.0f}" for k in ("ES", "PS", "NS")])
    print_table(heads + ([memory] if memory else []) + ["ES", "PS", "NS"], rows)
    r0 = results[0]
    for r in results[1:]:
        print(
            f"{r0['variant']} is {r0['edits_per_s'] / r['edits_per_s']:.2f}x the edits/s of {r['variant']} "
            f"(z-optimisation alone: {r['phases']['z'] / r0['phases']['z']:.2f}x)"
        )


class PeakMemory:
    """Wall time and peak memory of a block, in MiB: this process's peak resident set (Linux's VmHWM, reset at entry
    through /proc/self/clear_refs: exact and free, unlike a sampling thread that would take CPU from the work being
    timed) and on CUDA `torch.cuda.max_memory_allocated`. Where the reset is not allowed, the peak is the
    process's since start (`reset` is then False)."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")
        self.rss_mib = 0.0
        self.gpu_mib: float | None = None
        self.seconds = 0.0
        self.reset = False

    def __enter__(self) -> Self:
        self.reset = reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.gpu_mib = torch.cuda.max_memory_allocated() / 2**20
        self.seconds = time.perf_counter() - self._t0
        peak = peak_rss_mib()
        self.rss_mib = peak if peak is not None else process_peak_mib()


def overrides_of(pairs: list[str]) -> dict:
    """`key=value` overrides; values read as TOML scalars (`tau=0.01`, `mpes=false`, `method="memit"` or
    a bare word), checked later by `edit_config_from`."""
    out = {}
    for kv in pairs:
        key, sep, text = kv.partition("=")
        if not sep:
            sys.exit(f"--set {kv!r}: expected key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = text
    return out


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def print_table(headers, rows) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def write_json(path: str | None, doc: dict) -> None:
    doc = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **doc,
    }
    if path:
        Path(path).write_text(json.dumps(doc, indent=1))
        print(f"wrote {path}")


def rates_of(lm, requests) -> dict:
    """ES / PS / NS (0-100) of a torch model on CounterFact-style requests."""
    from edit2deploy.probes import probes_for, rates, run_probes
    from edit2deploy.scoring import TorchScorer

    r = rates(run_probes(TorchScorer(lm.model, lm.tokenizer), probes_for(requests)))
    return {"ES": r["edit"], "PS": r["paraphrase"], "NS": r["neighborhood"]}


@torch.no_grad()
def perplexity(lm, ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) of `ids`, scored in consecutive windows of `window` tokens."""
    device = next(lm.model.parameters()).device
    nll, count = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        x = torch.tensor([ids[s : s + window]], device=device)
        if x.shape[1] < 2:
            break
        logits = lm.model(input_ids=x, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None])[:, 0]
        nll -= float(lp.sum())
        count += lp.numel()
    return math.exp(nll / count)


def tail_ids(lm, n_tokens: int) -> list[int]:
    """The last `n_tokens` tokens of WikiText-2 test: held-out text (statistics read the file's start)."""
    text = WIKITEXT.read_text(encoding="utf-8")
    tail = text[-n_tokens * 8 :]
    return lm.tokenizer(tail, add_special_tokens=False)["input_ids"][-n_tokens:]
