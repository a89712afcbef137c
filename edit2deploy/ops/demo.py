"""The demo: `run` on the built-in SmolLM2 with the example edits, then a short chat with the edited GGUF."""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..formats import FORMATS
from ..requests import EditRequest

if TYPE_CHECKING:  # annotations only: the CLI reads this module's constants before any heavy import
    from .results import TargetResult

DEMO_MODEL = "smollm2-135m"
# 10,000 model-generated tokens: the edits' rates are within a case set's noise of 20,000's and 100,000's
# (benchmarks/RESULTS.md, 5.4), and sampling them is most of a first demo's time
DEMO_N_TOKENS = 10_000


def demo_edits_path() -> Path:
    return Path(str(importlib.resources.files("edit2deploy").joinpath("data/demo_edits.jsonl")))


def demo_targets() -> tuple[list[str], str | None]:
    targets = ["gguf:Q4_K_M"]
    if "onnx" not in FORMATS:
        return targets, "the onnx format is not available in this version: exporting gguf only"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return (
            targets,
            "onnxruntime-genai is not installed (pip install 'edit2deploy[onnx]'): exporting gguf only",
        )
    return [*targets, "onnx:int8"], None


def demo_chat(target: TargetResult, requests: Sequence[EditRequest]) -> list[str]:
    """The chat that verify held with the edited GGUF in llama.cpp (the GGUF's own chat template, greedy) and with
    its unedited paired baseline: the user sends an edited fact's prompt. Shows the first fact whose reply gives the
    new answer (verdict 'new'), and says how many do; the report lists every reply."""
    gen = target.verification.generation
    rows = (
        [] if gen is None else [r for r in gen.rows if r.probe.kind == "chat" and r.probe.source == "prompt"]
    )
    name = target.artifact.path.name
    if not rows or rows[0].by["artifact"].text is None:
        return [f"chat in llama.cpp with {name}: no chat replies (generation off, or no chat template)"]
    shown = [r for r in rows if r.by["artifact"].verdict == "new"]
    row = (shown or rows)[0]
    lines = [
        f"chat in llama.cpp with {name} (greedy, the model's chat template):",
        f"  user: {row.probe.text}",
        f"  assistant (edited): {_one_line(row.by['artifact'].text)}",
    ]
    if "baseline" in row.by:
        lines.append(
            f"  assistant (unedited, same {target.target.quant} export): {_one_line(row.by['baseline'].text or '')}"
        )
    lines.append(
        f"({len(shown)} of {len(rows)} edited facts give their new answer in this chat (verdict 'new'); "
        "report.html lists every reply)"
    )
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())
