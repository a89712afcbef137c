"""Facts: score what a model says about facts (p(target) vs p(true), top-1), for `edit2deploy facts`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import UsageError
from ..models import open_model
from ..probes import PROBE_KINDS, ProbeResult, probes_for, rates, run_probes
from ..requests import load_requests
from ..scoring import TorchScorer


def parse_kinds(text: str | Sequence[str]) -> list[str]:
    """`"edit,paraphrase"` → probe kinds, each one of `PROBE_KINDS`."""
    items = text.split(",") if isinstance(text, str) else list(text)
    kinds = [k.strip() for k in items if k.strip()]
    expected = f"expected a comma list of {', '.join(PROBE_KINDS)}"
    if not kinds:
        raise UsageError(f"--probes: empty list ({expected})")
    bad = [k for k in kinds if k not in PROBE_KINDS]
    if bad:
        raise UsageError(f"--probes: unknown kind '{','.join(bad)}' ({expected})")
    return kinds


def score_facts(
    model: str | Path,
    facts: str | Path,
    kinds: str | Sequence[str] = "edit",
    limit: int | None = None,
    device: str = "cpu",
) -> tuple[list[ProbeResult], dict[str, float | None]]:
    """Every probe of the facts file scored on the model, and the success rate per kind."""
    wanted = parse_kinds(kinds)
    requests = load_requests(facts, limit=limit)
    lm = open_model(model, device=device)
    results = run_probes(
        TorchScorer(lm.model, lm.tokenizer), probes_for(requests, wanted), decode=lm.tokenizer.decode
    )
    return results, rates(results)
