"""Neighbour keys: the batch's own prompts asked about other names, held still by the solve.

An edit's update answers to every key near its subject's key. The keys it must not move most are those of
the same question about other subjects ("The mother tongue of <someone else> is"): they share the
relation's context and sit in directions that ordinary text (the covariance C) hardly uses, so AlphaEdit's
null space leaves them free. Putting ‖ΔW Kn‖² into the objective keeps those answers where they were
(benchmarks/RESULTS.md, "Neighbour keys").

The names come from the statistics corpus (`stats.corpus_names`), never from the evaluation data; each
request draws its own from a seed fixed by its text, so a re-run sees the same neighbours.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from ..requests import EditRequest


def neighbour_requests(
    requests: Sequence[EditRequest], names: Sequence[str], per_request: int
) -> list[EditRequest]:
    """`per_request` neighbours of each request, request by request: its prompt with another name as subject."""
    out = []
    for r in requests:
        seed = int.from_bytes(hashlib.sha256(r.text.encode()).digest()[:8], "big")
        pool = [n for n in names if n != r.subject]
        for name in random.Random(seed).sample(pool, min(per_request, len(pool))):
            out.append(EditRequest(prompt=r.prompt, subject=name, target_new=r.target_new))
    return out
