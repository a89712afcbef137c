"""`edit_model`: load a model, apply an edit file in sequential batches, write the patched model + ledger.

The input model directory is only read. The output directory appears (by rename) only when it is
complete; a batch whose solve is not finite is not applied, and the run stops there.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..arch import input_device
from ..atomic import atomic_dir, kill_point, remove_stale_temps
from ..errors import NonFiniteUpdateError, UsageError
from ..formats.gguf.sampler import sampler_for
from ..ledger import Ledger, tensor_sha256
from ..memory import PeakMemory, release_freed
from ..methods import EditConfig, Editor
from ..methods.editor import LayerState, check_layers, method_spec
from ..methods.harden import HardenConfig, Hardener
from ..methods.keys import context_templates, generate_prefixes
from ..methods.preserved import facts_digest, name_facts, preserved_keys
from ..models import (
    BUILTIN_MODELS,
    LoadedModel,
    cache_root,
    check_device,
    open_model,
    resolve_model_dir,
    weights_fingerprint,
)
from ..precision import hold_in_float32
from ..quantsim import QuantScheme, Simulation
from ..requests import EditRequest, load_requests, merge_duplicates
from ..stats import (
    DEFAULT_N_TOKENS,
    Corpus,
    corpus_from_path,
    corpus_names,
    covariance_files,
    generated_corpus,
    key_stats,
)
from .settings import check_edit_config, check_run_values


@dataclass
class EditRun:
    """What an edit run did."""

    out: Path | None
    batches: list[dict] = field(default_factory=list)
    failed: dict | None = None
    seconds: float = 0.0
    stats_seconds: float = 0.0
    memory: PeakMemory = field(default_factory=PeakMemory)  # "load", "statistics", then each batch id


def _state_from_ledger(ledger: Ledger, layers) -> dict[int, LayerState]:
    """Method state of each layer: the active batches' stored keys, and the null basis."""
    out = {}
    for li in layers:
        keys = [
            ledger.batch_tensors[b][f"keys.{li}"].to(torch.float64)
            for b in ledger.active_batches
            if f"keys.{li}" in ledger.batch_tensors[b]
        ]
        basis = ledger.method_state.get(f"null_basis.{li}")
        complement = ledger.method_state.get(f"null_complement.{li}")
        if keys or basis is not None or complement is not None:
            d_in = keys[0].shape[0] if keys else (basis if basis is not None else complement).shape[0]
            out[li] = LayerState(
                d_in,
                previous=keys,
                null_basis=basis if basis is not None else complement,
                complement=basis is None and complement is not None,
            )
    return out


def _state_into_ledger(ledger: Ledger, state: dict[int, LayerState]) -> None:
    # The previous keys are not stored here: each batch's record holds its own, and rollback only has to drop a batch.
    for li, st in state.items():
        if st.null_basis is not None:
            # one of the two: U as `null_basis.<layer>`, or its complement V as `null_complement.<layer>`
            name, other = (
                ("null_complement", "null_basis") if st.complement else ("null_basis", "null_complement")
            )
            ledger.method_state[f"{name}.{li}"] = st.null_basis
            ledger.method_state.pop(f"{other}.{li}", None)


def statistics_corpus(corpus: str | Path | None, lm: LoadedModel) -> Corpus:
    """`corpus_from_path`; the generated corpus is sampled in llama.cpp where it can be (a model wholly on the CPU,
    a family GGUF holds, llama-cpp-python installed): about twice torch's speed on a CPU. Under torchrun rank 0
    alone samples (`stats.corpus_token_chunks`), so one process and N sample the same text."""
    corp = corpus_from_path(corpus)
    if corp.path is not None or hasattr(lm.model, "hf_device_map") or input_device(lm.model).type != "cpu":
        return corp
    sampler = sampler_for(lm.model_dir, cache_root() / "sampling")
    return corp if sampler is None else generated_corpus(sampler)


def base_spec(spec: str) -> str:
    return spec if spec in BUILTIN_MODELS else str(Path(spec).resolve())


def prepare_editor(
    lm: LoadedModel,
    cfg: EditConfig,
    corpus: str | Path | None = None,
    n_tokens: int | None = None,
    quiet: bool = False,
    preserved: Sequence[EditRequest] = (),
    avoid: Sequence[str] = (),
) -> tuple[Editor, Ledger, float]:
    """An `Editor` for `lm` with statistics, prefixes and method state (continuing an existing ledger).

    `preserved`: facts whose keys leave the null space when it is built (a model's first edit; see
    `methods.preserved`); on a model whose null space exists they must be the facts it was built with.
    With `cfg.preserve_names` the statistics corpus's names join them, less those occurring in `avoid`
    (the texts about to be edited)."""
    spec = method_spec(cfg.method)
    layers = check_layers(cfg.layers or lm.arch.layers_for(lm.num_layers), lm.num_layers)  # before any work
    if preserved and not spec.uses_projector:
        raise UsageError(f"--preserved shapes the null space of alphaedit and default; {cfg.method} has none")
    if preserved and cfg.neighbour_null:
        raise UsageError("neighbour_null and --preserved both reshape the null space; use one of them")
    # Edited projections in float32 whatever the model's dtype: a bf16 W + ΔW would lose part of ΔW.
    hold_in_float32(lm.model, [lm.arch.mlp_out_name(li) for li in layers])
    ledger = Ledger.load(lm.model_dir)
    if ledger is None:
        corp = statistics_corpus(corpus, lm)
        ledger = Ledger.new(
            base_spec(lm.spec),
            weights_fingerprint(lm.model_dir),
            corpus=corp.id,
            corpus_path=None if corp.path is None else str(corp.path),
            n_tokens=n_tokens or DEFAULT_N_TOKENS,
            # sampled on rank 0 alone under torchrun: every rank must optimise in the same contexts
            prefixes=distributed.broadcast_object(generate_prefixes(lm) if distributed.is_main() else None),
            weights_dtype=str(lm.dtype).removeprefix("torch."),
        )
    else:
        if corpus is not None and corpus_from_path(corpus).id != ledger.state["corpus"]:
            raise UsageError(
                "--corpus differs from the one this model's earlier edits used; omit it to continue"
            )
        if n_tokens is not None and n_tokens != ledger.state["n_tokens"]:
            raise UsageError(
                f"--n-tokens differs from the earlier edits' {ledger.state['n_tokens']}; omit it"
            )
        corp = statistics_corpus(ledger.state.get("corpus_path"), lm)
    t = time.perf_counter()
    kill_point("statistics")
    stats = key_stats(
        lm, layers, ledger.state["base_fingerprint"], corp, ledger.state["n_tokens"], quiet=quiet
    )
    # Read back from the cache one layer at a time where every layer is there (it is after `key_stats`, unless
    # the cache cannot be written), so no C is held through the passes below and the editor holds one C while it
    # builds each null space.
    files = covariance_files(lm, layers, ledger.state["base_fingerprint"], corp, ledger.state["n_tokens"])
    covariances = files if files is not None else {li: s.C for li, s in stats.items()}
    del stats  # the editor holds the only references to C, and drops each once no solve needs it
    release_freed()
    names: list[str] = []
    if cfg.neighbour_weight and cfg.neighbour_names:
        # kept with the method state, so later batches and later runs draw neighbours from the same names
        if "names" not in ledger.state:
            ledger.state["names"] = corpus_names(
                lm, ledger.state["base_fingerprint"], corp, ledger.state["n_tokens"], quiet=quiet
            )
        names = ledger.state["names"]
    state = _state_from_ledger(ledger, layers)
    unbuilt = [li for li in layers if li not in state or state[li].null_basis is None]
    named: list[EditRequest] = []
    if cfg.preserve_names and spec.preserves_names and not cfg.neighbour_null and unbuilt:
        all_names = corpus_names(
            lm, ledger.state["base_fingerprint"], corp, ledger.state["n_tokens"], quiet=quiet
        )
        named = name_facts(all_names, avoid)
    preserved_k = (
        _preserved_keys(lm, ledger, unbuilt, preserved, named, cfg, quiet) if preserved or named else None
    )
    stats_seconds = time.perf_counter() - t
    editor = Editor(
        lm,
        cfg,
        covariances,
        ledger.state["prefixes"],
        state=state,
        quiet=quiet,
        base={li: ledger.originals[n] for li in layers if (n := lm.arch.weight_name(li)) in ledger.originals},
        names=names,
        preserved=preserved_k,
    )
    return editor, ledger, stats_seconds


def _preserved_keys(
    lm: LoadedModel,
    ledger: Ledger,
    unbuilt: Sequence[int],
    preserved: Sequence[EditRequest],
    named: Sequence[EditRequest],
    cfg: EditConfig,
    quiet: bool,
) -> dict[int, torch.Tensor] | None:
    """The keys (d_in, n) of the preserved facts (the user's, then the corpus names') for the layers whose null
    space is still to be built (None when all exist: the persisted basis already holds them), recorded in the
    ledger's method state."""
    digest = facts_digest(preserved)
    recorded = ledger.state.get("preserved")
    had_facts = recorded is not None and recorded["facts"] > 0
    if preserved and had_facts and recorded["sha256"] != digest:
        raise UsageError(
            "--preserved differs from the facts this model's null space was built with at its first edit "
            f"({recorded['facts']} facts); omit --preserved to continue with those"
        )
    if not unbuilt:
        if preserved and not had_facts:
            raise UsageError(
                "--preserved: this model's null space was built at its first edit without preserved facts; "
                "they can only be given with a model's first edits"
            )
        return None
    ledger.state["preserved"] = {
        "facts": len(preserved),
        "sha256": digest,
        "names": len(named),
        "weight": cfg.preserve_weight,
    }
    if not distributed.is_main():
        return None  # under torchrun only rank 0 builds the null space (`Editor`)
    templates = context_templates(ledger.state["prefixes"])
    return preserved_keys(lm, [*preserved, *named], templates, unbuilt, quiet)


def apply_requests(
    editor: Editor,
    ledger: Ledger,
    requests: list[EditRequest],
    batch_size: int,
    quiet: bool = False,
    harden: Hardener | None = None,
    memory: PeakMemory | None = None,
) -> EditRun:
    """Apply `requests` in batches of `batch_size`, recording each batch in the ledger (`harden`: make each
    batch survive the simulated quantization of its targets, see `methods.harden`); each batch's peak memory
    goes into its record and into `memory`."""
    lm, arch = editor.lm, editor.lm.arch
    run = EditRun(out=None, memory=memory or PeakMemory())
    start = time.perf_counter()
    chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    for chunk in tqdm(chunks, desc="edit batches", unit="batch", disable=quiet or len(chunks) == 1):
        names = {li: arch.weight_name(li) for li in editor.layers}
        before = {li: arch.get_weight(lm.model, li).detach().cpu().clone() for li in editor.layers}
        t = time.perf_counter()
        batch_id = ledger.next_batch_id()
        kill_point("z-optimisation")  # apply_batch starts with the batch's keys and target values
        try:
            with run.memory.stage(batch_id):
                report = editor.apply_batch(chunk, harden=harden, originals=before)
        except NonFiniteUpdateError as exc:
            run.failed = {"batch": batch_id, "error": str(exc), "requests": [r.id for r in chunk]}
            ledger.add_event({"type": "failed_batch", **run.failed})
            break
        tensors, record_t = {}, {}
        for li, name in names.items():
            after = arch.get_weight(lm.model, li).detach().cpu()
            w0 = ledger.originals.get(name, before[li])
            tensors[f"delta.{name}"] = report.deltas[li]
            tensors[f"keys.{li}"] = report.keys[li]
            record_t[name] = {
                "layer": li,
                "sha256_before": tensor_sha256(before[li]),
                "sha256_after": tensor_sha256(after),
                "delta_fro": float(report.deltas[li].double().norm()),
                "fro_from_original": float((after.double() - w0.double()).norm()),
            }
        record = {
            "id": batch_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - t, 3),
            "timings": {k: round(v, 3) for k, v in report.timings.items()},
            # MiB; a run's first batch also holds the run's loading and statistics peaks
            "peak_rss_mib": {
                **{
                    k: v for k, v in run.memory.rss.items() if k in ("load", "statistics") and not run.batches
                },
                "batch": run.memory.rss[batch_id],
            },
            "method": editor.cfg.method,
            "config": editor.cfg.to_json(),
            "layers": list(editor.layers),
            "active_before": ledger.active_batches,  # what "sha256_before" is the state of (for rollback checks)
            "requests": [r.to_json() for r in chunk],
            "steps": report.steps,
            "converged": report.converged,
            "tensors": record_t,
        }
        if report.hardening is not None:
            record["hardening"] = report.hardening
        if report.retry is not None:
            record["retry"] = report.retry
        ledger.add_batch(record, tensors, {names[li]: before[li] for li in editor.layers})
        run.batches.append(record)
    _state_into_ledger(ledger, editor.state)
    run.seconds = time.perf_counter() - start
    return run


# Shard size of a model written with offloaded weights: transformers reads a shard's offloaded tensors back into
# memory before writing it (at its default 50GB, a whole big model at once).
OFFLOADED_SHARD_SIZE = "2GB"


def write_model(lm: LoadedModel, ledger: Ledger, out: Path) -> None:
    """Write the patched model (HF directory) and its ledger; `out` appears only when complete.

    Weights offloaded by a device map (on the meta device here) are read back, shard by shard, and written as
    they are (transformers' `save_pretrained`)."""
    remove_stale_temps(out)  # what a killed edit left half-written
    offloaded = any(p.device.type == "meta" for p in lm.model.parameters())
    with atomic_dir(out, replace=True) as tmp:
        with warnings.catch_warnings():
            # its advice (free memory for a whole 50GB shard) is what the smaller shards take care of
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            lm.model.save_pretrained(tmp, **({"max_shard_size": OFFLOADED_SHARD_SIZE} if offloaded else {}))
        lm.tokenizer.save_pretrained(tmp)
        ledger.record_weights(tmp)
        kill_point("ledger")
        ledger.write_into(tmp)


def edit_model(
    model: str,
    edits: str | Path | list[EditRequest],
    out: str | Path,
    cfg: EditConfig | None = None,
    batch_size: int | None = None,
    corpus: str | Path | None = None,
    n_tokens: int | None = None,
    device: str = "cpu",
    force: bool = False,
    limit: int | None = None,
    quiet: bool = False,
    harden_for: Sequence[Callable[[LoadedModel, list[str]], QuantScheme]] = (),
    harden: HardenConfig | None = None,
    preserved: Sequence[EditRequest] = (),
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: dict | str | None = None,
) -> EditRun:
    """Edit `model` with the requests in `edits` and write the result to `out`.

    `preserved`: facts that must not change; their keys leave AlphaEdit's null space (`prepare_editor`).

    `harden_for`: one factory per deployment target, `(model, edited tensor names) -> QuantScheme` (the face
    builds them from the format simulators); each batch is then hardened against those targets.

    Under torchrun (`cli.edit`: the process group is started) the ranks share each batch's z-optimisation
    (`Editor.optimise`), rank 0 solves and broadcasts ΔW (`Editor.solve`), and rank 0 alone writes `out` while
    the others wait; every rank returns the same run. Hardening runs in one process only.

    `device_map="auto"` (with `max_memory`, e.g. "0=20GiB,cpu=60GiB"): a model past one device is placed across
    the GPUs, the CPU and disk by accelerate's big-model inference, the edited layers held in memory
    (`models.open_model`); one process, without hardening."""
    cfg = check_edit_config(cfg or EditConfig())
    check_run_values({"batch_size": batch_size, "n_tokens": n_tokens, "corpus": corpus}, "edit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"edit: field 'limit': expected an integer ≥ 1, got {limit!r}")
    check_device(device)
    if harden_for and distributed.world_size() > 1:
        raise UsageError(
            "--harden-for does not run across processes (torchrun); run this edit as one process"
        )
    if device_map is not None and distributed.world_size() > 1:
        raise UsageError(
            "--device-map does not run across processes (torchrun); run this edit as one process"
        )
    if device_map is not None and harden_for:
        raise UsageError(
            "--harden-for does not run with --device-map (simulating a target swaps every weight, offloaded or not)"
        )
    main = distributed.is_main()
    quiet = quiet or not main  # rank 0 alone shows progress
    out = Path(out)
    if isinstance(edits, list):
        requests = merge_duplicates(edits, "edits")
    else:
        requests = load_requests(edits, limit=limit, merge=True)
    if distributed.world_size() > 1:
        # a built-in name or a .gguf is converted into the cache on first use: rank 0 converts, the others wait
        if main:
            resolve_model_dir(model)
        distributed.barrier()
    model_dir = resolve_model_dir(model)
    if out.resolve() == model_dir.resolve():
        raise UsageError(f"--out {out} is the input model directory; the input is never written")
    if out.exists() and not force:
        raise UsageError(f"--out {out} already exists (use --force to replace it)")
    requests = requests_for(model_dir, requests)
    memory = PeakMemory()
    with memory.stage("load"):
        lm = open_model(
            model,
            device=device,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            resident=cfg.layers,
        )
    edited_texts = [t for r in requests for t in (r.text, *r.paraphrases)]
    with memory.stage("statistics"):
        editor, ledger, stats_seconds = prepare_editor(
            lm, cfg, corpus, n_tokens, quiet=quiet, preserved=preserved, avoid=edited_texts
        )
    hardener = None
    if harden_for:
        edited = sorted(
            set(ledger.state.get("edited_tensors", [])) | {lm.arch.weight_name(li) for li in editor.layers}
        )
        sims = [Simulation(lm, make(lm, edited)) for make in harden_for]
        hardener = Hardener(sims, harden or HardenConfig(), quiet=quiet)
    run = apply_requests(
        editor, ledger, requests, batch_size or len(requests), quiet=quiet, harden=hardener, memory=memory
    )
    run.stats_seconds = stats_seconds
    if run.batches:
        with memory.stage("write"):
            if main:
                write_model(lm, ledger, out)
            distributed.barrier()  # no rank returns before `out` is complete
        run.out = out
    return run


def requests_for(model_dir: Path, requests: list[EditRequest]) -> list[EditRequest]:
    """The requests still to apply to the model in `model_dir`: an edited model's weights must be the ones its
    ledger describes, and requests it already holds are skipped (another target for one is an error)."""
    ledger = Ledger.load(model_dir)
    if ledger is not None:
        ledger.check_weights(model_dir, "editing it further")
        requests = ledger.new_requests(requests, model_dir)
    if not requests:
        raise UsageError(f"every edit request is already in {model_dir}'s edit ledger; nothing to do")
    return requests


def compute_stats(
    model: str | Path,
    corpus: str | Path | None = None,
    n_tokens: int | None = None,
    layers: Sequence[int] | None = None,
    device: str = "cpu",
    quiet: bool = False,
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: dict | str | None = None,
) -> tuple[dict, str, float]:
    """Key statistics (C = E[k kᵀ]) of the edited layers, computed once and cached; returns (statistics per
    layer, corpus id, seconds). `device_map`/`max_memory` as `edit_model`'s."""
    if device_map is not None and distributed.world_size() > 1:
        raise UsageError(
            "--device-map does not run across processes (torchrun); run statistics as one process"
        )
    lm = open_model(
        model,
        device=device,
        dtype=dtype,
        device_map=device_map,
        max_memory=max_memory,
        resident=tuple(layers) if layers else None,
    )
    chosen = tuple(layers) if layers else lm.arch.layers_for(lm.num_layers)
    source = statistics_corpus(corpus, lm)
    t = time.perf_counter()
    stats = key_stats(
        lm, chosen, weights_fingerprint(lm.model_dir), source, n_tokens or DEFAULT_N_TOKENS, quiet=quiet
    )
    return stats, source.id, time.perf_counter() - t
