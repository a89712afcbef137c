"""The demo: `run` on the built-in SmolLM2 with the example edits, then a short chat with the edited GGUF."""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..formats import FORMATS, get_format
from ..requests import EditRequest

if TYPE_CHECKING:  # annotations only: the CLI reads this module's constants before any heavy import
    from .results import TargetResult

DEMO_MODEL = "smollm2-135m"
DEMO_N_TOKENS = 20_000


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


def demo_chat(target: TargetResult, requests: Sequence[EditRequest], max_tokens: int = 24) -> list[str]:
    """A short chat in llama.cpp (the GGUF's own chat template, greedy) with the edited GGUF and its unedited paired
    baseline: the user sends an edited fact's prompt. Shows the first fact whose new answer carries over into the
    chat, and says how many do (every fact is scored in the report either way)."""
    exporter = get_format("gguf")
    edited = exporter.scorer(target.artifact)
    try:
        replies = [
            (r, edited.chat([{"role": "user", "content": r.text}], max_tokens=max_tokens)) for r in requests
        ]
    finally:
        edited.close()
    shown = [(r, a) for r, a in replies if r.target_new.lower() in a.lower()]
    request, reply = (shown or replies)[0]
    lines = [
        f"chat in llama.cpp with {target.artifact.path.name} (greedy, the model's chat template):",
        f"  user: {request.text}",
        f"  assistant (edited): {_one_line(reply)}",
    ]
    if target.baseline is not None:
        base = exporter.scorer(target.baseline)
        try:
            before = base.chat([{"role": "user", "content": request.text}], max_tokens=max_tokens)
        finally:
            base.close()
        lines.append(f"  assistant (unedited, same {target.target.quant} export): {_one_line(before)}")
    lines.append(
        f"({len(shown)} of {len(requests)} edited facts show their new answer in this free-form chat; "
        "the report scores all of them)"
    )
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())
