"""Synthetically edited models: what `edit` leaves behind for an exporter, without running an edit.

Export tests and the export benchmark need an "edited" model whose edited tensors differ from the base and are named
in the edit-ledger state (exporters protect them); a small seeded perturbation is enough for that and takes a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .ledger import LEDGER_DIR, STATE_FILE


def perturbed_copy(
    src: Path | str,
    dst: Path | str,
    names: list[str],
    scale: float = 0.01,
    base_model: str = "smollm2-135m",
    seed: int = 1,
) -> Path:
    """Copy the HF directory `src` to `dst` with tensors `names` changed by `scale`·std·N(0, 1) noise (seeded) and a
    ledger state naming them as edited, with `base_model` as the unedited model's spec."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    sd = load_file(src / "model.safetensors")
    missing = [n for n in names if n not in sd]
    if missing:
        raise KeyError(f"{src / 'model.safetensors'} has no tensor {missing[0]!r}")
    g = torch.Generator().manual_seed(seed)
    for n in names:
        w = sd[n]
        sd[n] = (w + scale * w.std() * torch.randn(w.shape, generator=g)).contiguous()
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / LEDGER_DIR).mkdir(exist_ok=True)
    (dst / LEDGER_DIR / STATE_FILE).write_text(
        json.dumps({"base_model": base_model, "edited_tensors": names})
    )
    return dst
