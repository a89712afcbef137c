"""The bitsandbytes runtime: a checkpoint loaded back with `from_pretrained` (as a deployment does), scored in torch."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...scoring import Scored, TorchScorer
from ..base import Artifact
from .export import _torch_dtype, require_bnb


def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


class BnbScorer(TorchScorer):
    """`TorchScorer` on a bitsandbytes checkpoint loaded back with `from_pretrained` (as a deployment does)."""

    name = "bitsandbytes"

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        # LLM.int8 casts float32 activations to float16 (documented behaviour); bitsandbytes logs that once per
        # layer and call, which would bury a run's output
        log = logging.getLogger("bitsandbytes.autograd._functions")
        log.addFilter(_quiet_int8_cast)
        try:
            return super().score(pairs)
        finally:
            log.removeFilter(_quiet_int8_cast)

    def close(self) -> None:
        self.model = None  # drop the weights now (a run verifies several targets in a row)


def open_scorer(artifact: Artifact, batch_size: int = 32, **kwargs: Any) -> BnbScorer:
    """A `Scorer` on a bitsandbytes directory: the checkpoint's own quantization_config decides how it loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_bnb()
    art = artifact
    path = Path(art.path)
    dtype = (art.extra.get("options") or {}).get("dtype", "float32")
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=_torch_dtype(dtype), **kwargs)
    return BnbScorer(model.eval(), AutoTokenizer.from_pretrained(path), batch_size=batch_size)
