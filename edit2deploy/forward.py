"""Forward-pass shortcuts that keep using the model's own modules (so any architecture works).

- `run_until_stop`: a hook raises `StopForward` once it has what it needs; layers above are skipped.
- `replay_lower_blocks`: blocks up to a layer return cached outputs instead of computing them
  (z-optimisation changes nothing below the edited layer, so those blocks need to run only once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been captured."""


def run_until_stop(module: torch.nn.Module, **inputs) -> None:
    """Run a forward pass that a hook may cut short with `StopForward` (no cache unless `inputs` bring one)."""
    try:
        module(**({"use_cache": False} | inputs))
    except StopForward:
        pass


@contextlib.contextmanager
def replay_lower_blocks(
    blocks: list[torch.nn.Module], top_output: Callable[[], torch.Tensor], returns_tuple: bool
) -> Iterator[None]:
    """Blocks before the last pass their input through; the last returns `top_output()`.

    `returns_tuple` mirrors the real blocks' return type (some families return `(hidden, ...)`).
    """

    def wrap(h: torch.Tensor):
        return (h,) if returns_tuple else h

    def passthrough(hidden_states, *args, **kwargs):
        return wrap(hidden_states)

    def top(hidden_states, *args, **kwargs):
        return wrap(top_output())

    for b in blocks[:-1]:
        b.forward = passthrough
    blocks[-1].forward = top
    try:
        yield
    finally:
        for b in blocks:
            del b.forward  # back to the class's forward
