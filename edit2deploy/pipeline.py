"""One call from edits to verified artifacts: edit → export every target → verify each in its runtime → reports.

    from edit2deploy.pipeline import run
    result = run("smollm2-135m", "examples/edits.jsonl", ["gguf:Q4_K_M", "gguf:Q8_0"], "out/run")
    result.passed, result.reports["html"]

Layout of the output directory `out`:

    model/                        the edited fp32 model (Hugging Face directory + edit ledger)
    artifacts/model-Q4_K_M.gguf   one artifact per target (gguf: a file; other formats: model-<format>-<quant>/)
    artifacts/model-Q4_K_M.gguf.edit2deploy.json   its sidecar record (what was exported, from which weights)
    artifacts/model-Q4_K_M.Modelfile               Ollama recipe (gguf only): `ollama create NAME -f ...`
    report.json, report.md, report.html

Every stage is cached, so running again with the same inputs only re-scores:
- key statistics: the statistics cache (`edit2deploy.stats`);
- editing: skipped when `model/` holds a ledger whose requests, batches, configuration, corpus and base model
  equal this run's;
- export: skipped when an artifact's sidecar names the same target, protection and source weights (SHA-256);
- paired baselines: cached under the user cache dir (`cli_deploy.baseline_path`), shared with `verify`.

Crash safety: every output is written under a temporary name (".<name>.tmp-<pid>-...") and renamed when
complete. An artifact's sidecar (and Modelfile) are written before the artifact is renamed into place, and a stale
artifact is deleted before a new export starts, so a file under its final name always matches its sidecar.
Temporaries left by a killed run are deleted by the next one.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import TEMP_MARK, _pid_alive, _temp_sibling, remove_path
from .errors import Edit2DeployError, UsageError

if TYPE_CHECKING:
    from .exporters import Artifact, Exporter
    from .methods import EditConfig
    from .methods.harden import HardenConfig
    from .requests import EditRequest
    from .scoring import Scored, Scorer
    from .verify import GateResult, Gates, Verification

MODEL_SUBDIR = "model"
ARTIFACTS_SUBDIR = "artifacts"
HELDOUT_RESOURCE = "data/heldout.txt"
PIPELINE_GATES = ("perplexity_increase",)  # gates the pipeline adds to verify's Gates


# ================================================================== targets
@dataclass(frozen=True)
class Target:
    """One deployment target: a registered format and one of its types, e.g. gguf:Q4_K_M."""

    format: str
    quant: str

    def __str__(self) -> str:
        return f"{self.format}:{self.quant}"

    @property
    def filename(self) -> str:
        """The artifact's name under `artifacts/`."""
        if self.format == "gguf":
            return f"model-{self.quant}.gguf"
        return f"model-{self.format}-{self.quant}"


def _exporters():
    from edit2deploy import exporters

    return exporters


def parse_targets(spec: str | Sequence[str]) -> list[Target]:
    """`"gguf:Q4_K_M,onnx:int4"` (or a list of such strings) → targets, checked against the FORMATS registry.

    Unregistered formats and unknown types are one `UsageError` that lists what is available.
    """
    ex = _exporters()
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise UsageError("--targets: empty (expected e.g. gguf:Q4_K_M,gguf:Q8_0)")
    available = ", ".join(ex.FORMATS)
    missing = []
    out: list[Target] = []
    for part in parts:
        fmt, sep, quant = part.partition(":")
        fmt, quant = fmt.strip().lower(), quant.strip()
        if not sep or not fmt or not quant:
            raise UsageError(
                f"--targets: '{part}' is not FORMAT:TYPE (e.g. gguf:Q4_K_M; formats: {available})"
            )
        if fmt not in ex.FORMATS:
            missing.append(part)
            continue
        quants = list(ex.FORMATS[fmt].quants())
        canon = {q.lower(): q for q in quants}
        if quant.lower() not in canon:
            raise UsageError(
                f"--targets: '{part}': {fmt} has no type '{quant}' (expected one of: {', '.join(quants)})"
            )
        t = Target(fmt, canon[quant.lower()])
        if t not in out:
            out.append(t)
    if missing:
        raise UsageError(
            f"--targets: format not available: {', '.join(missing)} (available formats: {available})"
        )
    return out


# ================================================================== gates
def split_gates(items: Sequence[str] | Mapping[str, Any] | None) -> tuple[list[str], dict[str, float | None]]:
    """Gate settings → (NAME=VALUE strings for `verify.Gates`, the pipeline's own gates)."""
    if items is None:
        return [], {}
    if isinstance(items, Mapping):
        items = [f"{k}={'off' if v is None or v is False else v}" for k, v in items.items()]
    verify_items, own = [], {}
    for item in items:
        name, _, value = str(item).partition("=")
        key = name.strip().replace("-", "_")
        if key in PIPELINE_GATES:
            if not value.strip():
                raise UsageError(f"--gate {item}: expected NAME=VALUE")
            try:
                own[key] = None if value.strip() == "off" else float(value)
            except ValueError:
                raise UsageError(f"--gate {item}: '{value}' is not a number (or 'off')") from None
        else:
            verify_items.append(str(item))
    return verify_items, own


def gates_for(exporter: Exporter, quant: str, items: Sequence[str]) -> Gates:
    """The format's default gates for `quant` (if it has any), overridden by `items`."""
    from .verify import Gates

    default = getattr(exporter, "default_gates", None)
    return Gates.parse(items, default(quant) if default else Gates())


# ================================================================== held-out text (perplexity probe)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")


def heldout_pairs(text: str, max_pairs: int = 16) -> list[tuple[str, str]]:
    """(first sentence, rest) of each paragraph (paragraphs are separated by blank lines).

    Paragraphs of one sentence are skipped. The continuation keeps its leading space (it follows the prompt).
    """
    pairs = []
    for para in re.split(r"\n\s*\n", text.strip()):
        para = " ".join(para.split())
        m = _SENTENCE_END.search(para)
        if not m:
            continue
        first, rest = para[: m.start()].rstrip(), para[m.start() :]
        first += para[m.start() : m.end()].rstrip()  # a closing quote/bracket belongs to the sentence
        rest = " " + para[m.end() :].strip()
        if first.strip() and rest.strip():
            pairs.append((first, rest))
        if len(pairs) >= max_pairs:
            break
    return pairs


@dataclass(frozen=True)
class HeldOut:
    source: str  # "package:edit2deploy/data/heldout.txt" or a file path
    pairs: tuple[tuple[str, str], ...]


def load_heldout(path: str | Path | None = None) -> HeldOut:
    """The perplexity probe: a file's paragraphs, or (default) the public-domain passage shipped in the package."""
    if path is None:
        text = importlib.resources.files("edit2deploy").joinpath(HELDOUT_RESOURCE).read_text(encoding="utf-8")
        source = f"package:edit2deploy/{HELDOUT_RESOURCE}"
    else:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--heldout {p}: file not found")
        text, source = p.read_text(encoding="utf-8", errors="replace"), str(p)
    pairs = heldout_pairs(text)
    if not pairs:
        raise UsageError(f"--heldout {source}: no paragraph with two or more sentences")
    return HeldOut(source, tuple(pairs))


@dataclass(frozen=True)
class Perplexity:
    value: float
    n_tokens: int

    def to_json(self) -> dict:
        return {"value": self.value, "n_tokens": self.n_tokens}


def perplexity(scorer: Scorer, pairs: Sequence[tuple[str, str]]) -> Perplexity:
    """exp(−mean log p) over every continuation token of the (prompt, continuation) pairs."""
    scored = scorer.score(list(pairs))
    n = sum(len(s.logprobs) for s in scored)
    total = sum(s.total for s in scored)
    return Perplexity(math.exp(-total / max(1, n)), n)


SCORES_VERSION = 1


class CachedScorer:
    """A `Scorer` that remembers scores per (prompt, continuation), optionally on disk, and opens the real scorer
    (`factory()`) only when something is not remembered yet.

    The fp32 references are scored once however many targets compare against them, and a rerun whose models and
    artifacts did not change scores nothing at all. `key` names what is being scored (weights fingerprint, or an
    artifact's record, size and mtime); it is stored with the scores and checked on load.
    """

    name = "cached"

    def __init__(self, factory: Callable[[], Scorer], store: Path | None = None, key: dict | None = None):
        self._factory = factory
        self._inner: Scorer | None = None
        self.store = store
        self.key = _jsonable(key or {})
        self._memo: dict[tuple[str, str], Scored] = {}
        self._dirty = False
        self.hits = self.misses = 0
        if store is not None:
            self._load()

    @property
    def inner(self) -> Scorer:
        if self._inner is None:
            self._inner = self._factory()
        return self._inner

    @property
    def opened(self) -> bool:
        return self._inner is not None

    def tokenize(self, prompt: str, continuation: str):
        return self.inner.tokenize(prompt, continuation)

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        todo = [p for p in dict.fromkeys(tuple(p) for p in pairs) if p not in self._memo]
        self.misses += len(todo)
        self.hits += len(pairs) - len(todo)
        if todo:
            self._memo.update(zip(todo, self.inner.score(todo)))
            self._dirty = True
        return [self._memo[tuple(p)] for p in pairs]

    def _load(self) -> None:
        from .scoring import Scored

        try:
            doc = json.loads(self.store.read_text())
            if doc.get("version") != SCORES_VERSION or doc.get("key") != self.key:
                return
            for prompt, cont, s in doc["scores"]:
                self._memo[(prompt, cont)] = Scored(
                    tuple(s["prompt_ids"]),
                    tuple(s["target_ids"]),
                    tuple(s["logprobs"]),
                    tuple(s["greedy_ids"]),
                )
        except (OSError, ValueError, KeyError, TypeError):
            self._memo.clear()  # missing or damaged: score again

    def save(self) -> None:
        if self.store is None or not self._dirty:
            return
        from .atomic import atomic_file

        doc = {
            "version": SCORES_VERSION,
            "key": self.key,
            "scores": [
                [
                    p,
                    c,
                    {
                        "prompt_ids": list(s.prompt_ids),
                        "target_ids": list(s.target_ids),
                        "logprobs": list(s.logprobs),
                        "greedy_ids": list(s.greedy_ids),
                    },
                ]
                for (p, c), s in self._memo.items()
            ],
        }
        with atomic_file(self.store, "w") as fh:
            json.dump(doc, fh)
        self._dirty = False

    def close(self) -> None:
        self.save()
        inner, self._inner = self._inner, None
        _close(inner)


def scores_store(kind: str, key: dict) -> Path:
    """Where the scores of one model/artifact are remembered (under the user cache dir)."""
    import hashlib

    from .models import cache_root

    digest = hashlib.sha256(json.dumps(_jsonable(key), sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "scores" / f"{kind}-{digest}.json"


def _file_identity(path: Path) -> dict:
    """What identifies the bytes of an artifact without hashing them: path, size and mtime of every file."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return {
        "path": str(path.resolve()),
        "files": [
            [str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns]
            for f in files
        ],
    }


def _torch_factory(model_dir: Path, device: str) -> Callable[[], Scorer]:
    def make() -> Scorer:
        from .models import open_model
        from .scoring import TorchScorer

        lm = open_model(model_dir, device=device)
        return TorchScorer(lm.model, lm.tokenizer)

    return make


def _artifact_factory(exporter: Exporter, art: Artifact) -> Callable[[], Scorer]:
    return lambda: exporter.scorer(art)


# ================================================================== results
@dataclass
class TargetResult:
    """What one target produced and how it verified."""

    target: Target
    artifact: Artifact
    verification: Verification
    gates: Gates
    baseline: Artifact | None = None
    perplexity: Perplexity | None = None  # the artifact
    baseline_perplexity: Perplexity | None = None  # the paired baseline
    export_cached: bool = False
    baseline_cached: bool = False
    modelfile: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verification.passed


@dataclass
class RunResult:
    """Everything `run` did; `report.build_report(result)` is its JSON form."""

    out: Path
    model: str  # what the user named
    edits: str  # where the requests came from
    model_dir: Path  # out/model
    base_model_dir: Path  # the unedited model (paired baselines, base fp32)
    requests: list[EditRequest]
    config: dict
    edit_cached: bool
    edit_note: str  # why editing ran (or "reused")
    ledger_state: dict
    ledger_records: list[dict]
    heldout: HeldOut
    perplexity: dict[str, Perplexity]  # "fp32" (edited), "base_fp32"
    targets: list[TargetResult]
    seconds: dict[str, float]
    reports: dict[str, Path] = field(default_factory=dict)
    protect_edits: str = "q8_0"
    preserved_source: str | None = None

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.targets)


# ================================================================== helpers
def _log_to_stderr(msg: str) -> None:
    print(f"edit2deploy: {msg}", file=sys.stderr, flush=True)


def _temp_name(final: Path) -> Path:
    return _temp_sibling(final)


def clean_stale_temps(directory: Path) -> list[Path]:
    """Delete temporaries (".<name>.tmp-<pid>-..."; nested ones too) left in `directory` by dead processes."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not p.name.startswith(".") or TEMP_MARK not in p.name:
            continue
        pids = [int(m) for m in re.findall(re.escape(TEMP_MARK) + r"(\d+)-", p.name)]
        if not pids or any(_pid_alive(pid) for pid in pids):
            continue
        remove_path(p)
        removed.append(p)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def _chunks(requests: Sequence[EditRequest], batch_size: int) -> list[list[dict]]:
    return [[r.to_json() for r in requests[i : i + batch_size]] for i in range(0, len(requests), batch_size)]


# ================================================================== stage 1: edit
def resolved_config(cfg: EditConfig, model_dir: Path) -> EditConfig:
    """`cfg` as the `Editor` records it: default layers and the method's MPES default filled in."""
    from dataclasses import replace

    from transformers import AutoConfig

    from .arch import architecture_for
    from .methods.editor import check_layers, method_spec

    config = AutoConfig.from_pretrained(model_dir)
    n_layers = config.get_text_config().num_hidden_layers
    layers = check_layers(cfg.layers or architecture_for(config.model_type).layers_for(n_layers), n_layers)
    mpes = method_spec(cfg.method).mpes if cfg.values.mpes is None else cfg.values.mpes
    return replace(cfg, layers=layers, values=replace(cfg.values, mpes=mpes))


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
    from .ledger import Ledger
    from .models import weights_fingerprint
    from .stats import corpus_from_path

    if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
        return "no edited model yet"
    try:
        ledger = Ledger.load(model_dir)
    except UsageError as exc:
        return f"unreadable ledger ({exc})"
    if ledger is None:
        return "no ledger"
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
    if _jsonable(records[: len(prior_records)]) != _jsonable(prior_records):
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
    if [r["requests"] for r in new] != _jsonable(_chunks(requests, batch_size)):
        return "other edit requests or batching"
    want = _jsonable(resolved_config(cfg, input_dir).to_json())
    if any(r.get("config") != want for r in new):
        return "another edit configuration"
    got = [
        None
        if "hardening" not in r
        else {"targets": r["hardening"].get("targets"), "config": r["hardening"].get("config")}
        for r in new
    ]
    if any(g != _jsonable(harden_key) for g in got):
        return "other hardening settings"
    return None


def _edit_stage(
    model: str,
    requests: list[EditRequest],
    out_model: Path,
    cfg: EditConfig,
    batch_size: int | None,
    corpus,
    n_tokens: int | None,
    device: str,
    quiet: bool,
    log: Callable[[str], None],
    harden: tuple[list[Target], str, HardenConfig] | None = None,
) -> tuple[bool, str, float]:
    from .editing import base_spec, edit_model
    from .ledger import Ledger
    from .models import resolve_model_dir
    from .stats import DEFAULT_N_TOKENS

    input_dir = resolve_model_dir(model)
    if out_model.resolve() == input_dir.resolve():
        raise UsageError(f"--out: {out_model} is the input model; choose another output directory")
    prior = Ledger.load(input_dir)
    tokens = n_tokens if n_tokens is not None else (prior.state["n_tokens"] if prior else DEFAULT_N_TOKENS)
    bs = batch_size or len(requests)
    factories, harden_key, harden_cfg = [], None, None
    if harden is not None:
        from .cli_predict import SchemeSpec, build_scheme

        targets, protect, harden_cfg = harden
        specs = [SchemeSpec(t.format, t.quant, protect) for t in targets]
        factories = [
            (lambda lm, edited, spec=spec: build_scheme(spec, lm.model_dir, edited_tensors=edited))
            for spec in specs
        ]
        harden_key = {"targets": [str(sp) for sp in specs], "config": harden_cfg.to_json()}
    problem = edit_reuse_problem(
        out_model, base_spec(model), input_dir, requests, cfg, bs, corpus, tokens, harden_key
    )
    if problem is None:
        log(f"edit: reusing {out_model} (same requests, configuration and base model)")
        return True, "reused", 0.0
    log(f"edit: {len(requests)} request(s) into {out_model} ({problem})")
    t = time.perf_counter()
    res = edit_model(
        model,
        requests,
        out_model,
        cfg=cfg,
        batch_size=bs,
        corpus=corpus,
        n_tokens=n_tokens,
        device=device,
        force=True,
        quiet=quiet,
        harden_for=factories,
        harden=harden_cfg,
    )
    if res.failed:
        raise Edit2DeployError(f"edit batch {res.failed['batch']} was not applied: {res.failed['error']}")
    return False, problem, time.perf_counter() - t


# ================================================================== stage 2: export
def _run_marker(target: Target, protect: str, source_fp: str) -> dict:
    return {"target": str(target), "protect_edits": protect, "source_fingerprint": source_fp}


def _load(exporter: Exporter, path: Path) -> Artifact | None:
    """The artifact record at `path`, or None when it is missing, unreadable or not this format's."""
    if not path.exists():
        return None
    try:
        if not exporter.detect(path):
            return None
        return exporter.load(path)
    except Exception:  # noqa: BLE001 - a damaged or half-written artifact, whatever the format raises: export again
        return None


def reusable_artifact(exporter: Exporter, path: Path, marker: dict) -> Artifact | None:
    """The artifact at `path` if it exists, is recognised by its format and its record says `marker`."""
    art = _load(exporter, path)
    return art if art is not None and art.extra.get("run") == marker else None


def _store_record(art: Artifact, tmp: Path, final: Path) -> None:
    """Write `art` (path = final) where its format keeps the record: inside a directory artifact
    (`edit2deploy.json`, ONNX) or as the sidecar next to the final name (GGUF)."""
    from .atomic import atomic_file
    from .exporters import sidecar_path, write_sidecar

    inside = tmp / "edit2deploy.json"
    if tmp.is_dir() and inside.is_file():
        with atomic_file(inside, "w") as fh:
            json.dump(art.to_json(), fh, indent=1)
            fh.write("\n")
    else:
        write_sidecar(art)
    _remove(sidecar_path(tmp))


def export_target(
    exporter: Exporter,
    target: Target,
    model_dir: Path,
    out: Path,
    protect: str,
    source_fp: str,
    progress: bool = False,
) -> tuple[Artifact, bool]:
    """Export `model_dir` to `out` for `target`, or reuse what is there; returns (artifact, reused).

    Order (crash safety): delete a stale artifact, then its sidecar; export to a temporary name; write the final
    record (sidecar) and the Modelfile; rename the artifact into place (the commit point).
    """
    from .exporters import sidecar_path

    marker = _run_marker(target, protect, source_fp)
    art = reusable_artifact(exporter, out, marker)
    if art is not None:
        return art, True
    _remove(out)
    _remove(sidecar_path(out))
    scratch = _temp_name(
        out
    )  # a private directory next to `out`: the export is written in it under its own name
    scratch.mkdir()
    tmp = scratch / out.name
    kwargs = {"progress": progress} if target.format in ("gguf", "onnx") else {}
    try:
        art = exporter.export(model_dir, tmp, target.quant, protect, **kwargs)
        art.path = out
        art.extra = {**art.extra, "run": marker}
        _store_record(art, tmp, out)
        if target.format == "gguf":
            write_modelfile(out, model_dir)
        os.replace(tmp, out)  # the commit point
    finally:
        _remove(scratch)
    return art, False


def paired_baseline(
    exporter: Exporter,
    art: Artifact,
    base_model_dir: Path,
    base_fp: str,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[Artifact, bool]:
    """The unedited model exported like `art` (cached under the user cache dir); returns (baseline, reused).

    A cached file without its record (an export killed between renaming the file and writing its sidecar) is
    exported again."""
    from .cli_deploy import baseline_path

    path = baseline_path(art, base_fp)
    cached = _load(exporter, path)
    if cached is not None and cached.mode != "unknown":
        return cached, True
    _remove(path)
    log(f"paired baseline {art.format}:{art.quant}: exporting the unedited model -> {path}")
    return exporter.paired_baseline(art, base_model_dir, path), False


# ================================================================== Ollama
def write_modelfile(gguf_path: Path, model_dir: Path) -> Path:
    """Write `<stem>.Modelfile` next to a GGUF (atomically)."""
    from .atomic import atomic_file
    from .modelfile import modelfile_for

    path = gguf_path.with_suffix(".Modelfile")
    text = modelfile_for(gguf_path.name, model_dir)
    with atomic_file(path, "w") as fh:
        fh.write(text)
    return path


# ================================================================== verification
def perplexity_gate(limit: float, art: Perplexity | None, base: Perplexity | None) -> GateResult:
    """Artifact perplexity at most `limit` percent above its paired baseline's."""
    from .verify import GateResult

    if art is None or base is None:
        return GateResult(
            "perplexity_increase", None, limit, False, "perplexity not measured (no paired baseline)"
        )
    inc = 100.0 * (art.value / base.value - 1.0)
    return GateResult(
        "perplexity_increase",
        inc,
        limit,
        inc <= limit,
        f"perplexity {art.value:.2f} vs paired baseline {base.value:.2f}: {inc:+.1f}% (allowed ≤ {limit}%)",
    )


# ================================================================== run
def run(
    model: str,
    edits: str | Path | list[EditRequest],
    targets: str | Sequence[str] | Sequence[Target],
    out: str | Path,
    *,
    cfg: EditConfig | None = None,
    gates: Sequence[str] | Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    corpus: str | Path | None = None,
    n_tokens: int | None = None,
    preserved: str | Path | None = None,
    preserved_n: int = 50,
    heldout: str | Path | None = None,
    protect_edits: str = "q8_0",
    baseline: bool = True,
    device: str = "cpu",
    quiet: bool = False,
    reports: bool = True,
    log: Callable[[str], None] | None = None,
    harden: bool | HardenConfig = False,
) -> RunResult:
    """Edit `model` with `edits`, export every target, verify each against fp32 and its paired baseline, and
    write report.json/.md/.html into `out`. See the module docstring for the layout and the caches.

    `gates`: NAME=VALUE strings or a mapping (verify's gates plus `perplexity_increase`, percent over the paired
    baseline; 'off'/None disables). `harden`: True (or a `HardenConfig`) hardens every batch against the
    quantization of the run's own targets, as `edit --harden-for` does. Raises `UsageError` for bad inputs
    (before any heavy work).
    """
    from .exporters import ExportPolicy
    from .methods import EditConfig
    from .methods.harden import HardenConfig
    from .requests import load_requests

    t_start = time.perf_counter()
    log = log or ((lambda m: None) if quiet else _log_to_stderr)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    cfg = cfg or EditConfig()
    parsed = parse_targets([str(t) for t in ([targets] if isinstance(targets, str) else targets)])
    ExportPolicy.coerce(protect_edits)  # usage error early
    verify_items, own_gates = split_gates(gates)
    target_gates = {t: gates_for(_exporters().FORMATS[t.format], t.quant, verify_items) for t in parsed}
    if isinstance(edits, list):
        requests, edits_source = list(edits), "<list>"
    else:
        requests, edits_source = load_requests(edits), str(edits)
    if not requests:
        raise UsageError(f"--edits {edits_source}: no edit requests")
    extra_preserved = load_requests(preserved, limit=preserved_n) if preserved else []
    held = load_heldout(heldout)
    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be at least 1")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    art_dir = out / ARTIFACTS_SUBDIR
    art_dir.mkdir(exist_ok=True)
    for d in (out, art_dir):
        for p in clean_stale_temps(d):
            log(f"removed {p.name} (left by an interrupted run)")
    seconds: dict[str, float] = {}

    # ---- 1. edit
    model_dir = out / MODEL_SUBDIR
    edit_cached, edit_note, seconds["edit"] = _edit_stage(
        model,
        requests,
        model_dir,
        cfg,
        batch_size,
        corpus,
        n_tokens,
        device,
        quiet,
        log,
        None
        if not harden
        else (parsed, protect_edits, harden if isinstance(harden, HardenConfig) else HardenConfig()),
    )
    from .ledger import Ledger
    from .models import resolve_model_dir, weights_fingerprint

    ledger = Ledger.load(model_dir)
    assert ledger is not None
    base_model_dir = resolve_model_dir(ledger.state["base_model"])
    base_fp = ledger.state["base_fingerprint"]
    source_fp = weights_fingerprint(model_dir)

    # ---- 2. export (+ paired baselines)
    ex = _exporters()
    arts: dict[Target, tuple[Artifact, bool, Artifact | None, bool, dict]] = {}
    for t in parsed:
        exporter = ex.FORMATS[t.format]
        dest = art_dir / t.filename
        log(f"export {t} -> {dest}")
        t0 = time.perf_counter()
        art, cached = export_target(
            exporter, t, model_dir, dest, protect_edits, source_fp, progress=not quiet
        )
        secs = {"export": 0.0 if cached else time.perf_counter() - t0}
        if cached:
            log(f"export {t}: reusing {dest.name} (sidecar matches)")
        base_art, base_cached = None, False
        if baseline:
            t0 = time.perf_counter()
            base_art, base_cached = paired_baseline(exporter, art, base_model_dir, base_fp, log)
            secs["baseline"] = 0.0 if base_cached else time.perf_counter() - t0
            if base_cached:
                log(f"paired baseline {t}: reusing {base_art.path}")
        arts[t] = (art, cached, base_art, base_cached, secs)

    # ---- 3. verify (scores are remembered per model/artifact identity: an unchanged rerun opens no model)
    log("verify: fp32 references")
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    decode = AutoTokenizer.from_pretrained(model_dir).decode
    ref_key = {"scorer": "torch", "weights": source_fp, "device": device}
    base_key = {"scorer": "torch", "weights": base_fp, "device": device}
    reference = CachedScorer(_torch_factory(model_dir, device), scores_store("torch", ref_key), ref_key)
    base_reference = CachedScorer(
        _torch_factory(base_model_dir, device), scores_store("torch", base_key), base_key
    )
    ppl = {"fp32": perplexity(reference, held.pairs), "base_fp32": perplexity(base_reference, held.pairs)}
    seconds["reference"] = time.perf_counter() - t0
    results: list[TargetResult] = []
    from tqdm.auto import tqdm

    from .verify import verify

    try:
        for t in tqdm(parsed, desc="verify", unit="target", disable=quiet or len(parsed) < 2):
            art, cached, base_art, base_cached, secs = arts[t]
            exporter = ex.FORMATS[t.format]
            log(f"verify {t}")
            t0 = time.perf_counter()
            akey = {"target": str(t), "record": art.to_json(), **_file_identity(art.path)}
            scorer = CachedScorer(_artifact_factory(exporter, art), scores_store(t.format, akey), akey)
            base_scorer = None
            if base_art is not None:
                bkey = {"target": str(t), "baseline_of": base_fp, **_file_identity(base_art.path)}
                base_scorer = CachedScorer(
                    _artifact_factory(exporter, base_art), scores_store(t.format, bkey), bkey
                )
            try:
                ver = verify(
                    requests,
                    reference,
                    scorer,
                    base_reference,
                    base_scorer,
                    extra_preserved,
                    target_gates[t],
                    decode,
                )
                art_ppl = perplexity(scorer, held.pairs)
                base_ppl = perplexity(base_scorer, held.pairs) if base_scorer is not None else None
            finally:
                scorer.close()
                if base_scorer is not None:
                    base_scorer.close()
            if own_gates.get("perplexity_increase") is not None:
                ver.gates.append(perplexity_gate(own_gates["perplexity_increase"], art_ppl, base_ppl))
            secs["verify"] = time.perf_counter() - t0
            mf = art.path.with_suffix(".Modelfile") if t.format == "gguf" else None
            results.append(
                TargetResult(
                    t,
                    art,
                    ver,
                    target_gates[t],
                    base_art,
                    art_ppl,
                    base_ppl,
                    cached,
                    base_cached,
                    mf if mf is not None and mf.is_file() else None,
                    {k: round(v, 3) for k, v in secs.items()},
                )
            )
    finally:
        reference.close()
        base_reference.close()
    seconds["total"] = time.perf_counter() - t_start
    result = RunResult(
        out=out,
        model=str(model),
        edits=edits_source,
        model_dir=model_dir,
        base_model_dir=base_model_dir,
        requests=requests,
        config=_jsonable(cfg.to_json()),
        edit_cached=edit_cached,
        edit_note=edit_note,
        ledger_state=ledger.state,
        ledger_records=ledger.records,
        heldout=held,
        perplexity=ppl,
        targets=results,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        protect_edits=protect_edits,
        preserved_source=None if preserved is None else str(preserved),
    )
    if reports:
        from .report import write_reports

        result.reports = write_reports(result)
    return result


def _close(scorer) -> None:
    close = getattr(scorer, "close", None)
    if close is not None:
        close()
