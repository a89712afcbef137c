"""One call from edits to verified artifacts: edit → export every target (+ paired baselines) → verify each in its
runtime → reports. Each stage is a function with a typed result (`ops.results`).

    from edit2deploy.ops.run import RunConfig, run
    result = run(RunConfig("smollm2-135m", "examples/edits.jsonl", "gguf:Q4_K_M,gguf:Q8_0", "out/run"))
    result.passed, result.reports["html"]

Layout of the output directory `out`:

    model/                        the edited fp32 model (Hugging Face directory + edit ledger)
    artifacts/model-Q4_K_M.gguf   one artifact per target (gguf: a file; other formats: model-<format>-<quant>/)
    artifacts/model-Q4_K_M.gguf.edit2deploy.json   its record (what was exported, from which weights)
    artifacts/model-Q4_K_M.Modelfile               Ollama recipe (gguf only): `ollama create NAME -f ...`
    report.json, report.md, report.html

Every stage is cached, so running again with the same inputs only re-scores:
- key statistics: the statistics cache (`edit2deploy.stats`);
- editing: skipped when `model/` holds a ledger whose requests, batches, configuration, corpus and base model
  equal this run's (`ops.reuse`);
- export: skipped when an artifact's record names the same target and source weights (SHA-256);
- paired baselines: cached under the user cache dir (`ops.baseline`), shared with `verify`;
- scores: remembered per model/artifact identity (`ops.scores.CachedScorer`).

Crash safety: every output is written under a temporary name (".<name>.tmp-<pid>-...") and renamed when
complete. An artifact's record (and Modelfile) are written before the artifact is renamed into place, and a stale
artifact is deleted before a new export starts, so a file under its final name always matches its record.
Temporaries left by a killed run are deleted by the next one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic import clean_stale_temps, kill_point
from ..errors import Edit2DeployError, UsageError
from ..formats import DEFAULT_PROTECTION, Protection, Target, get_format, parse_targets
from ..gates import Gates, perplexity
from ..generation import DEFAULT_GENERATION
from ..ledger import Ledger
from ..memory import PeakMemory, available_mib
from ..methods import EditConfig
from ..methods.harden import HardenConfig
from ..models import check_device, check_max_memory, resolve_model_dir, weights_fingerprint
from ..report import write_reports
from ..requests import EditRequest, load_requests, merge_duplicates
from ..stats import DEFAULT_N_TOKENS
from .baseline import paired_baseline
from .edit import base_spec, edit_model, requests_for
from .export import export_target
from .predict import scheme_factories
from .report import build_report
from .results import EditStage, ExportStage, RunResult, TargetResult
from .reuse import edit_reuse_problem
from .scores import CachedScorer, HeldOut, OpenSlot, jsonable, load_heldout, scores_store, torch_factory
from .settings import check_edit_config, check_run_values
from .verify import check_artifact, gates_for

MODEL_SUBDIR = "model"
ARTIFACTS_SUBDIR = "artifacts"

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunConfig:
    """What `run` is asked to do (`edit2deploy run`'s flags and [run] table; `edit2deploy.run`'s arguments).

    `gates`: NAME=VALUE strings or a mapping ('off'/None disables). `harden`: True (or a `HardenConfig`) hardens
    every batch against the quantization of the run's own targets, as `edit --harden-for` does; None (default):
    hardened unless `device_map` places the model (hardening simulates the whole model on one device)."""

    model: str
    edits: str | Path | Sequence[EditRequest]
    targets: str | Target | Sequence[str | Target]
    out: str | Path
    cfg: EditConfig = field(default_factory=EditConfig)
    gates: Sequence[str] | Mapping[str, Any] | None = None
    batch_size: int | None = None
    corpus: str | Path | None = None
    n_tokens: int | None = None
    preserved: str | Path | None = None
    preserved_n: int = 50
    heldout: str | Path | None = None
    protect_edits: Protection | str = DEFAULT_PROTECTION
    baseline: bool = True
    device: str = "cpu"
    dtype: str = "auto"  # the model's weights, as `edit --dtype` (precision.WEIGHT_DTYPES)
    device_map: str | None = None  # "auto": placed across devices by accelerate, as `edit --device-map`
    max_memory: Mapping[str | int, int | str] | str | None = None  # with device_map, as `edit --max-memory`
    quiet: bool = False
    reports: bool = True
    harden: bool | HardenConfig | None = None
    generation: bool = True  # also judge generated text: completions and chat replies (generation.py)


# RunConfig fields with a [run] table twin, checked by the same rules (`ops.settings.RUN_FIELDS`)
RUN_CHECKED = (
    "model",
    "out",
    "gates",
    "batch_size",
    "corpus",
    "n_tokens",
    "preserved",
    "preserved_n",
    "heldout",
    "baseline",
    "generation",
    "dtype",
    "device_map",
)  # `device`, `max_memory` and `protect_edits` by their own parsers, whose messages name the flag


@dataclass(frozen=True)
class RunInputs:
    """A `RunConfig` validated and loaded: everything is checked here, before any heavy work starts."""

    config: RunConfig
    out: Path
    targets: list[Target]
    gates: dict[Target, Gates]
    requests: list[EditRequest]
    edits_source: str
    preserved: list[EditRequest]
    heldout: HeldOut
    harden: HardenConfig | None


def prepare(config: RunConfig) -> RunInputs:
    """Validate every input of a run (a `UsageError` names the first bad one) and load the small ones."""
    c = config
    given = {k: getattr(c, k) for k in RUN_CHECKED}
    given["edits"] = c.edits if isinstance(c.edits, (str, Path)) else None  # a list is checked when merged
    given["targets"] = c.targets if isinstance(c.targets, str) else None  # `Target`s: by parse_targets
    given["harden"] = None if isinstance(c.harden, HardenConfig) else c.harden
    check_run_values(given, "run")
    for flag in ("quiet", "reports"):
        if not isinstance(getattr(c, flag), bool):
            raise UsageError(f"run: field '{flag}': expected true or false, got {getattr(c, flag)!r}")
    check_edit_config(c.cfg)
    check_device(c.device)
    check_max_memory(c.max_memory)
    if c.max_memory is not None and c.device_map is None:
        raise UsageError("--max-memory needs --device-map auto")
    if c.device_map is not None and c.harden:
        raise UsageError(
            "--harden does not work with --device-map (hardening simulates the whole model); use --no-harden"
        )
    targets = parse_targets(config.targets, config.protect_edits, "--targets")
    gates = {t: gates_for(get_format(t.format), t.quant, config.gates) for t in targets}
    if isinstance(config.edits, (str, Path)):
        requests, source = load_requests(config.edits, merge=True), str(config.edits)
    else:
        requests, source = merge_duplicates(list(config.edits), "edits"), "<list>"
    if not requests:
        raise UsageError(f"--edits {source}: no edit requests")
    if config.batch_size is not None and config.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    preserved = load_requests(config.preserved, limit=config.preserved_n) if config.preserved else []
    hardened = config.harden if config.harden is not None else config.device_map is None
    harden = (
        config.harden if isinstance(config.harden, HardenConfig) else (HardenConfig() if hardened else None)
    )
    return RunInputs(
        config,
        Path(config.out),
        targets,
        gates,
        requests,
        source,
        preserved,
        load_heldout(config.heldout),
        harden,
    )


# ------------------------------------------------------------------ stage 1: edit
def edit_stage(inp: RunInputs, log: Log) -> EditStage:
    """Edit the model into `out/model`, or reuse what an earlier run with the same inputs wrote there."""
    c = inp.config
    out_model = inp.out / MODEL_SUBDIR
    input_dir = resolve_model_dir(c.model)
    if out_model.resolve() == input_dir.resolve():
        raise UsageError(f"--out: {out_model} is the input model; choose another output directory")
    prior = Ledger.load(input_dir)
    tokens = (
        c.n_tokens if c.n_tokens is not None else (prior.state["n_tokens"] if prior else DEFAULT_N_TOKENS)
    )
    requests = requests_for(input_dir, inp.requests) if prior is not None else inp.requests
    batch_size = c.batch_size or len(requests)
    harden_key = None
    if inp.harden is not None:
        harden_key = {"targets": [str(t) for t in inp.targets], "config": inp.harden.to_json()}
    problem = edit_reuse_problem(
        out_model,
        base_spec(c.model),
        input_dir,
        requests,
        c.cfg,
        batch_size,
        c.corpus,
        tokens,
        harden_key,
    )
    if problem is None and c.dtype != "auto":
        made = (
            (Ledger.load(out_model).state.get("weights_dtype") or "float32") if out_model.is_dir() else None
        )
        if made != c.dtype:
            problem = f"the weights were loaded in {made}, not {c.dtype}"
    t = time.perf_counter()
    peak = None
    if problem is None:
        log(f"edit: reusing {out_model} (same requests, configuration and base model)")
    else:
        log(f"edit: {len(requests)} request(s) into {out_model} ({problem})")
        res = edit_model(
            c.model,
            requests,
            out_model,
            cfg=c.cfg,
            batch_size=batch_size,
            corpus=c.corpus,
            n_tokens=c.n_tokens,
            device=c.device,
            dtype=c.dtype,
            device_map=c.device_map,
            max_memory=c.max_memory,
            force=True,
            quiet=c.quiet,
            harden_for=scheme_factories(inp.targets) if inp.harden is not None else (),
            harden=inp.harden,
        )
        if res.failed:
            raise Edit2DeployError(f"edit batch {res.failed['batch']} was not applied: {res.failed['error']}")
        peak = max(res.memory.rss.values(), default=None)
    ledger = Ledger.load(out_model)
    assert ledger is not None
    return EditStage(
        model_dir=out_model,
        base_model_dir=resolve_model_dir(ledger.state["base_model"]),
        base_fingerprint=ledger.state["base_fingerprint"],
        source_fingerprint=weights_fingerprint(out_model),
        ledger=ledger,
        cached=problem is None,
        note="reused" if problem is None else problem,
        seconds=0.0 if problem is None else time.perf_counter() - t,
        peak_rss_mib=peak,
    )


# ------------------------------------------------------------------ stage 2: export (+ paired baselines)
def export_stage(inp: RunInputs, edit: EditStage, log: Log, memory: PeakMemory) -> list[ExportStage]:
    """Export every target (reusing artifacts whose record matches), then its paired baseline."""
    out = []
    for t in inp.targets:
        fmt = get_format(t.format)
        dest = inp.out / ARTIFACTS_SUBDIR / fmt.artifact_name(t)
        log(f"export {t} -> {dest}")
        t0 = time.perf_counter()
        with memory.stage(f"export {t}"):
            art, cached = export_target(
                t, edit.model_dir, dest, edit.source_fingerprint, progress=not inp.config.quiet
            )
        stage = ExportStage(t, art, cached, seconds={"export": 0.0 if cached else time.perf_counter() - t0})
        if cached:
            log(f"export {t}: reusing {dest.name} (its record matches)")
        if inp.config.baseline:
            t0 = time.perf_counter()
            with memory.stage(f"baseline {t}"):
                stage.baseline, stage.baseline_cached = paired_baseline(
                    fmt, art, edit.base_model_dir, edit.base_fingerprint, log
                )
            stage.seconds["baseline"] = 0.0 if stage.baseline_cached else time.perf_counter() - t0
            if stage.baseline_cached:
                log(f"paired baseline {t}: reusing {stage.baseline.path}")
        out.append(stage)
    return out


# ------------------------------------------------------------------ stage 3: verify
@dataclass
class VerifyStage:
    perplexity: dict  # "fp32" (edited), "base_fp32": the references' held-out perplexity
    targets: list[TargetResult]
    reference_seconds: float


def verify_stage(
    inp: RunInputs, edit: EditStage, exports: Sequence[ExportStage], log: Log, memory: PeakMemory
) -> VerifyStage:
    """Score every artifact (and its paired baseline) against the fp32 references and apply the gates. Scores
    are remembered per model/artifact identity, so an unchanged rerun opens no model."""
    from transformers import AutoTokenizer

    c = inp.config
    device = c.device
    log("verify: fp32 references")
    t0 = time.perf_counter()
    decode = AutoTokenizer.from_pretrained(edit.model_dir).decode
    place = {"device": device} if c.device_map is None else {"device": device, "device_map": c.device_map}
    ref_key = {"scorer": "torch", "weights": edit.source_fingerprint, **place}
    base_key = {"scorer": "torch", "weights": edit.base_fingerprint, **place}
    slot = one_at_a_time(edit.model_dir, log)
    reference = CachedScorer(
        torch_factory(edit.model_dir, device, c.device_map, c.max_memory),
        scores_store("torch", ref_key),
        ref_key,
        slot,
    )
    base_reference = CachedScorer(
        torch_factory(edit.base_model_dir, device, c.device_map, c.max_memory),
        scores_store("torch", base_key),
        base_key,
        slot,
    )
    results = []
    try:
        with memory.stage("reference"):
            ppl = {
                "fp32": perplexity(reference, inp.heldout.pairs),
                "base_fp32": perplexity(base_reference, inp.heldout.pairs),
            }
        ref_seconds = time.perf_counter() - t0
        for ex in tqdm(exports, desc="verify", unit="target", disable=inp.config.quiet or len(exports) < 2):
            log(f"verify {ex.target}")
            kill_point("verify")  # the references are scored, their scores not yet remembered
            t0 = time.perf_counter()
            with memory.stage(f"verify {ex.target}"):
                check = check_artifact(
                    get_format(ex.target.format),
                    ex.artifact,
                    inp.requests,
                    reference,
                    base_reference,
                    ex.baseline,
                    inp.gates[ex.target],
                    decode,
                    inp.preserved,
                    inp.heldout,
                    cache_key={"target": str(ex.target), "base": edit.base_fingerprint},
                    generation=DEFAULT_GENERATION if inp.config.generation else None,
                    slot=slot,
                )
            secs = {**ex.seconds, "verify": time.perf_counter() - t0}
            results.append(_target_result(ex, check, inp.gates[ex.target], secs))
    finally:
        reference.close()
        base_reference.close()
    return VerifyStage(ppl, results, ref_seconds)


# Weights from which verify holds one runtime at a time whatever memory is free: the edited and unedited references
# and an artifact held together would take about three times the model; reopening one costs seconds at this size.
ONE_AT_A_TIME_MIB = 512


def one_at_a_time(model_dir: Path, log: Log) -> OpenSlot | None:
    """An `OpenSlot` (verify holds one runtime at a time, reloading as it goes) for a model of `ONE_AT_A_TIME_MIB`
    or more, or when three copies of it (edited and unedited references, an artifact) may not fit in the memory
    available now; else None (all stay open: a small model reopened would cost more time than it saves memory)."""
    size_mib = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20
    free = available_mib()
    tight = free is not None and 3 * size_mib >= free
    if tight:
        log(f"verify: one runtime at a time ({size_mib:,.0f} MiB of weights, {free:,.0f} MiB available)")
    return OpenSlot() if tight or size_mib >= ONE_AT_A_TIME_MIB else None


def _target_result(ex: ExportStage, check, gates: Gates, seconds: dict[str, float]) -> TargetResult:
    extra = [p for p in get_format(ex.target.format).extra_files(ex.artifact) if p.is_file()]
    return TargetResult(
        ex.target,
        ex.artifact,
        check.verification,
        gates,
        ex.baseline,
        check.perplexity,
        check.baseline_perplexity,
        ex.cached,
        ex.baseline_cached,
        extra[0] if extra else None,
        {k: round(v, 3) for k, v in seconds.items()},
    )


# ------------------------------------------------------------------ run
def _log_to_stderr(msg: str) -> None:
    tqdm.write(f"edit2deploy: {msg}", file=sys.stderr)  # above a progress bar that is drawing, not through it


def run(config: RunConfig, log: Log | None = None) -> RunResult:
    """Edit, export every target, verify each against fp32 and its paired baseline, and write
    report.json/.md/.html into `out`. See the module docstring for the layout and the caches. Raises
    `UsageError` for bad inputs, before any heavy work."""
    t_start = time.perf_counter()
    log = log or ((lambda m: None) if config.quiet else _log_to_stderr)
    inp = prepare(config)
    (inp.out / ARTIFACTS_SUBDIR).mkdir(parents=True, exist_ok=True)
    for d in (inp.out, inp.out / ARTIFACTS_SUBDIR):
        for p in clean_stale_temps(d):
            log(f"removed {p.name} (left by an interrupted run)")
    memory = PeakMemory()
    with memory.stage("edit"):
        edit = edit_stage(inp, log)
    # the edit resets the high-water mark for stages of its own: the stage's peak is the largest of them
    memory.at_least("edit", edit.peak_rss_mib)
    exports = export_stage(inp, edit, log, memory)
    verified = verify_stage(inp, edit, exports, log, memory)
    seconds = {"edit": edit.seconds, "reference": verified.reference_seconds}
    seconds["total"] = time.perf_counter() - t_start
    result = RunResult(
        out=inp.out,
        model=str(config.model),
        edits=inp.edits_source,
        model_dir=edit.model_dir,
        base_model_dir=edit.base_model_dir,
        requests=inp.requests,
        config=jsonable(config.cfg.to_json()),
        edit_cached=edit.cached,
        edit_note=edit.note,
        ledger_state=edit.ledger.state,
        ledger_records=edit.ledger.records,
        heldout=inp.heldout,
        perplexity=verified.perplexity,
        targets=verified.targets,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        protect_edits=Protection.parse(config.protect_edits).value,
        preserved_source=None if config.preserved is None else str(config.preserved),
        memory=memory.to_json(),
    )
    if config.reports:
        result.reports = write_reports(build_report(result), inp.out)
    return result
