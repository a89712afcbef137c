"""When a run can reuse the edited model already in its output directory: the reuse key of the edit stage,
computed from the same resolved configuration the `Editor` records (`methods.editor.resolve_config`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..arch import architecture_for
from ..errors import UsageError
from ..ledger import Ledger
from ..methods import EditConfig
from ..methods.editor import resolve_config
from ..models import read_chat_template, weights_fingerprint
from ..requests import EditRequest
from ..stats import corpus_from_path
from .scores import jsonable


def batches_json(requests: Sequence[EditRequest], batch_size: int) -> list[list[dict]]:
    """The requests of each sequential batch, as the ledger records them."""
    return [[r.to_json() for r in requests[i : i + batch_size]] for i in range(0, len(requests), batch_size)]


def resolved_config(cfg: EditConfig, model_dir: Path) -> EditConfig:
    """`cfg` as the `Editor` will record it for the model in `model_dir`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return resolve_config(
        cfg,
        architecture_for(config.model_type),
        config.get_text_config().num_hidden_layers,
        has_chat_template=read_chat_template(model_dir) is not None,
    )


def edit_reuse_problem(
    model_dir: Path,
    base_spec: str,
    input_dir: Path,
    requests: Sequence[EditRequest],
    cfg: EditConfig,
    batch_size: int,
    corpus,
    n_tokens: int,
    harden_key: dict | None = None,
) -> str | None:
    """Why `model_dir` cannot be reused for this edit run (None: it holds exactly this run's result).
    `harden_key`: the hardening targets and configuration each new batch must have been hardened with."""
    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        return "no edited model yet"
    try:
        ledger = Ledger.load(model_dir)
    except UsageError as exc:
        return f"unreadable ledger ({exc})"
    if ledger is None:
        return "no ledger"
    try:
        changed = ledger.weights_problem(model_dir)
    except UsageError as exc:
        changed = str(exc)
    if changed:
        return f"its weights no longer match its ledger: {changed}"
    prior = Ledger.load(input_dir)
    prior_records = prior.records if prior is not None else []
    state = ledger.state
    if prior is None:
        if state.get("base_model") != base_spec:
            return "another base model"
        if state.get("base_fingerprint") != weights_fingerprint(input_dir):
            return "the base model's weights changed"
    elif state.get("base_fingerprint") != prior.state.get("base_fingerprint"):
        return "another base model"
    records = ledger.records
    if jsonable(records[: len(prior_records)]) != jsonable(prior_records):
        return "the input model's ledger changed"
    new = records[len(prior_records) :]
    if any(r.get("type") != "batch" for r in new):
        return "the ledger holds failed batches or rollbacks"
    prior_active = prior.active_batches if prior is not None else []
    if ledger.active_batches != prior_active + [r["id"] for r in new]:
        return "other active batches"
    if state.get("corpus") != corpus_from_path(corpus).id and not (prior is not None and corpus is None):
        return "another statistics corpus"
    if state.get("n_tokens") != n_tokens:
        return "another statistics token count"
    if [r["requests"] for r in new] != jsonable(batches_json(requests, batch_size)):
        return "other edit requests or batching"
    want = jsonable(resolved_config(cfg, input_dir).to_json())
    if any(r.get("config") != want for r in new):
        return "another edit configuration"
    got = [
        None
        if "hardening" not in r
        else {"targets": r["hardening"].get("targets"), "config": r["hardening"].get("config")}
        for r in new
    ]
    if any(g != jsonable(harden_key) for g in got):
        return "other hardening settings"
    return None
