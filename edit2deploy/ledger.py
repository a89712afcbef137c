"""The edit ledger kept inside an edited model directory (under `edit2deploy/`).

Layout of an edited model directory:
    config.json, model.safetensors, tokenizer files   a normal Hugging Face directory
    edit2deploy/state.json        base model, statistics key, prefixes, edited tensors, active batches
    edit2deploy/ledger.jsonl      append-only: one record per applied batch, one per rollback
    edit2deploy/original.safetensors   each edited tensor as it was before its first edit
    edit2deploy/batches/<id>.safetensors   per-batch ΔW exactly as applied (float32) and the batch's keys
    edit2deploy/method_state.safetensors   AlphaEdit's null space: U or its complement V (Σ Kp Kpᵀ comes from the batches' keys)

Exact rollback: a tensor's state after batches b1..bk is W0 + Δ1 + ... + Δk added in that order
(float32 adds, the same operations the editor did), so replaying the kept batches reproduces
the recorded SHA-256 bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir
from .errors import InputFileError, InputProblem, UsageError, first_few
from .models import file_sha256
from .precision import WEIGHT_DTYPES
from .requests import EditRequest, fact_key

LEDGER_DIR = "edit2deploy"
STATE_FILE = "state.json"
LEDGER_FILE = "ledger.jsonl"
ORIGINAL_FILE = "original.safetensors"
METHOD_STATE_FILE = "method_state.safetensors"
BATCH_DIR = "batches"


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (dtype and shape are part of what the ledger records beside it)."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class EditInfo:
    """What an exporter needs to know about an edited model."""

    base_model: str | None = None  # spec of the unedited model (for paired baselines)
    edited_tensors: list[str] = field(default_factory=list)  # HF tensor names changed by the ledger


def read_edit_info(model_dir: Path | str) -> EditInfo:
    """Edit info of a model directory; an unedited directory gives an empty `EditInfo`."""
    path = Path(model_dir) / LEDGER_DIR / STATE_FILE
    if not path.is_file():
        return EditInfo()
    state = json.loads(path.read_text())
    return EditInfo(base_model=state.get("base_model"), edited_tensors=list(state.get("edited_tensors", [])))


@dataclass
class Ledger:
    """In-memory view of an edited model's ledger; `write_into` puts it in a directory being written."""

    state: dict
    records: list[dict]
    originals: dict[str, torch.Tensor]  # tensor name -> W0
    batch_tensors: dict[str, dict[str, torch.Tensor]]  # batch id -> tensors (delta.*, keys.*)
    method_state: dict[str, torch.Tensor]

    @classmethod
    def new(cls, base_model: str, base_fingerprint: str, **state) -> Ledger:
        st = {
            "format": 1,
            "base_model": base_model,
            "base_fingerprint": base_fingerprint,
            "edited_tensors": [],
            "batches": [],
            **state,
        }
        return cls(st, [], {}, {}, {})

    @classmethod
    def load(cls, model_dir: Path | str) -> Ledger | None:
        """The ledger of an edited directory, or None for an unedited one."""
        d = Path(model_dir) / LEDGER_DIR
        if not (d / STATE_FILE).is_file():
            return None
        try:
            state = json.loads((d / STATE_FILE).read_text())
            records = [json.loads(x) for x in (d / LEDGER_FILE).read_text().splitlines() if x.strip()]
            originals = load_file(d / ORIGINAL_FILE) if (d / ORIGINAL_FILE).is_file() else {}
            method_state = load_file(d / METHOD_STATE_FILE) if (d / METHOD_STATE_FILE).is_file() else {}
            batches = {p.stem: load_file(p) for p in sorted((d / BATCH_DIR).glob("*.safetensors"))}
        except (OSError, json.JSONDecodeError, ValueError, SafetensorError) as exc:
            raise UsageError(f"{d}: the edit ledger is damaged ({exc})") from exc
        return cls(state, records, originals, batches, method_state)

    @property
    def active_batches(self) -> list[str]:
        return list(self.state["batches"])

    def active_requests(self) -> list[EditRequest]:
        """The requests of the active batches, in the order they were applied."""
        return [
            EditRequest.from_json(q) for b in self.active_batches for q in self.batch_record(b)["requests"]
        ]

    def batch_record(self, batch_id: str) -> dict:
        for r in self.records:
            if r.get("type") == "batch" and r["id"] == batch_id:
                return r
        raise UsageError(
            f"no batch '{batch_id}' in the ledger (batches: {', '.join(self.active_batches) or 'none'})"
        )

    def next_batch_id(self) -> str:
        n = sum(1 for r in self.records if r.get("type") == "batch") + 1
        return f"batch-{n:04d}"

    def add_batch(
        self, record: dict, tensors: dict[str, torch.Tensor], originals: dict[str, torch.Tensor]
    ) -> None:
        for name, w0 in originals.items():
            if name not in self.originals:
                self.originals[name] = w0.detach().cpu().contiguous()
                self.state["edited_tensors"].append(name)
        record = {"type": "batch", **record}
        self.records.append(record)
        self.batch_tensors[record["id"]] = {k: v.contiguous() for k, v in tensors.items()}
        self.state["batches"].append(record["id"])

    def add_event(self, record: dict) -> None:
        self.records.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record})

    def write_into(self, model_dir: Path) -> None:
        d = model_dir / LEDGER_DIR
        (d / BATCH_DIR).mkdir(parents=True, exist_ok=True)
        (d / STATE_FILE).write_text(json.dumps(self.state, indent=1))
        (d / LEDGER_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.records))
        if self.originals:
            save_file(self.originals, str(d / ORIGINAL_FILE))
        if self.method_state:
            save_file({k: v.contiguous() for k, v in self.method_state.items()}, str(d / METHOD_STATE_FILE))
        for bid, tensors in self.batch_tensors.items():
            save_file(tensors, str(d / BATCH_DIR / f"{bid}.safetensors"))

    def recorded_sha256(self, name: str, batches: list[str]) -> str | None:
        """SHA-256 recorded for tensor `name` in the state "W0 + the listed batches", or None if that state
        was never recorded (e.g. a batch in the middle was rolled back).

        A batch record holds the tensor's hash before and after the batch, and which batches were
        active when it was applied; the state matches when those (restricted to batches that touched
        the tensor) are exactly `batches`' batches that touched it.
        """
        touched = [b for b in batches if name in self.batch_record(b)["tensors"]]
        if not touched:
            return tensor_sha256(self.originals[name])
        for rec in self.records:
            t = rec.get("tensors", {}).get(name) if rec.get("type") == "batch" else None
            if t is None or "active_before" not in rec:
                continue
            before = [b for b in rec["active_before"] if name in self.batch_record(b)["tensors"]]
            if before + [rec["id"]] == touched:
                return t["sha256_after"]
            if before == touched:
                return t["sha256_before"]
        return None

    def record_weights(self, model_dir: Path) -> None:
        """Remember the SHA-256 of every weights file of `model_dir` (being written with this ledger)."""
        self.state["weights_sha256"] = {f.name: file_sha256(f) for f in _weight_files(model_dir)}

    def weights_problem(self, model_dir: Path | str) -> str | None:
        """Why the weights in `model_dir` are not the ones this ledger describes (a byte changed after they were
        written), or None. Files are compared with their recorded SHA-256; a ledger from before those were
        recorded compares each edited tensor with its recorded (or replayed) state."""
        model_dir = Path(model_dir)
        recorded = self.state.get("weights_sha256")
        if recorded is not None:
            files = {f.name: f for f in _weight_files(model_dir)}
            if sorted(files) != sorted(recorded):
                return f"{model_dir}: weights files {sorted(files)} are not the ledger's {sorted(recorded)}"
            for name, sha in recorded.items():
                if file_sha256(files[name]) != sha:
                    return f"{files[name]}: SHA-256 differs from the one recorded in the edit ledger"
            return None
        found = _read_tensors(model_dir, set(self.originals))
        for name in self.originals:
            want = self.recorded_sha256(name, self.active_batches)
            want = want or tensor_sha256(self.replay(name, self.active_batches))
            if name not in found:
                return f"{model_dir}: edited tensor {name} is missing"
            if tensor_sha256(found[name]) != want:
                return f"{model_dir}: tensor {name} differs from the SHA-256 recorded in the edit ledger"
        return None

    def check_weights(self, model_dir: Path | str, what: str) -> None:
        """A usage error when `weights_problem` finds one: `what` (e.g. "rollback") is refused."""
        problem = self.weights_problem(model_dir)
        if problem:
            raise UsageError(f"{problem} (the weights were changed after they were written); {what} refused")

    def new_requests(self, requests: list[EditRequest], model_dir: Path | str) -> list[EditRequest]:
        """`requests` less those this ledger's active batches already applied (skipped with a one-line warning);
        one that gives an already edited fact another target is an error naming the batch."""
        known: dict[tuple[str, str], tuple[str, EditRequest]] = {}
        for b in self.active_batches:
            for q in self.batch_record(b)["requests"]:
                r = EditRequest.from_json(q)
                known.setdefault(fact_key(r), (b, r))
        out, problems, skipped = [], [], []
        for i, r in enumerate(requests):
            hit = known.get(fact_key(r))
            if hit is None:
                out.append(r)
            elif hit[1].target_new.strip() == r.target_new.strip():
                skipped.append(f"{r.where or f'request {i}'} ({hit[0]})")
            else:
                problems.append(
                    InputProblem(
                        r.where or f"edits: request {i}",
                        None,
                        "target_new",
                        f"'{r.target_new}' conflicts with '{hit[1].target_new}', which {hit[0]} of {model_dir} "
                        f"edited into the same subject '{r.subject}' and prompt '{r.prompt}' (roll it back first: "
                        f"edit2deploy rollback --model {model_dir} --batch {hit[0]})",
                    )
                )
        if problems:
            raise InputFileError(problems)
        if skipped:
            warnings.warn(
                f"skipped {len(skipped)} request(s) already edited into {model_dir}: {first_few(skipped)}",
                stacklevel=2,
            )
        return out

    def replay(self, name: str, batches: list[str]) -> torch.Tensor:
        """W0 + ΔW of each listed batch, added in order (bit-identical to what the editor produced)."""
        w = self.originals[name].clone()
        for bid in batches:
            delta = self.batch_tensors[bid].get(f"delta.{name}")
            if delta is not None:
                w.add_(delta)
        return w


def _read_tensors(model_dir: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The named tensors from a model directory's weights files (only those are read)."""
    out = {}
    for f in _weight_files(model_dir):
        try:
            with safe_open(str(f), "pt") as fh:
                for name in set(fh.keys()) & names:
                    out[name] = fh.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{f}: unreadable weights ({exc})") from exc
    return out


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir}: no *.safetensors weights")
    return files


def rollback(
    model_dir: Path | str, last: int | None = None, batch: str | None = None, out: Path | str | None = None
) -> dict:
    """Undo the last N batches, or one named batch, writing the result to `out` (default: in place).

    Returns a summary with the removed batches and, per edited tensor, whether the restored bytes
    match the SHA-256 recorded for that state.
    """
    model_dir = Path(model_dir)
    ledger = Ledger.load(model_dir)
    if ledger is None:
        raise UsageError(f"{model_dir}: no edit ledger (not a directory written by `edit2deploy edit`)")
    ledger.check_weights(model_dir, "rollback")
    active = ledger.active_batches
    if (last is None) == (batch is None):
        raise UsageError("rollback: give exactly one of --last N or --batch ID")
    if batch is not None:
        ledger.batch_record(batch)
        if batch not in active:
            raise UsageError(f"batch '{batch}' was already rolled back")
        removed = [batch]
    else:
        if last < 1 or last > len(active):
            raise UsageError(f"--last {last}: the ledger has {len(active)} active batch(es)")
        removed = active[-last:]
    kept = [b for b in active if b not in removed]
    expected = {name: ledger.recorded_sha256(name, kept) for name in ledger.originals}
    restored = {name: ledger.replay(name, kept) for name in ledger.originals}
    checks = {
        name: (tensor_sha256(w) == expected[name]) if expected[name] else None for name, w in restored.items()
    }
    if any(v is False for v in checks.values()):
        bad = [n for n, v in checks.items() if v is False]
        raise UsageError(f"rollback would not restore the recorded bytes of {bad}; nothing was written")
    ledger.state["batches"] = kept
    ledger.add_event({"type": "rollback", "removed": removed, "kept": kept})
    target = Path(out) if out is not None else model_dir
    with atomic_dir(target, replace=True) as tmp:
        for f in model_dir.iterdir():
            if f.name == LEDGER_DIR or f.suffix == ".safetensors":
                continue
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        for f in _weight_files(model_dir):
            tensors = load_file(f)
            for name in list(tensors):
                if name in restored:
                    # an edited projection is stored in float32; with no batch left on it, in the checkpoint's dtype
                    touched = any(name in ledger.batch_record(b)["tensors"] for b in kept)
                    dtype = (
                        tensors[name].dtype
                        if touched
                        else WEIGHT_DTYPES.get(ledger.state.get("weights_dtype", "auto"))
                    )
                    tensors[name] = restored[name].to(dtype or tensors[name].dtype).contiguous()
            save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        ledger.record_weights(tmp)
        ledger.write_into(tmp)
    return {"removed": removed, "kept": kept, "verified": checks}
