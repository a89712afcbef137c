"""Peak memory per stage: the most resident memory (and CUDA memory) a stage of work took.

Linux keeps a process's RSS high-water mark (VmHWM in /proc/self/status) and lets the process reset it to the
current RSS (writing 5 to /proc/self/clear_refs), so each stage's own peak is measurable without sampling.
Elsewhere the process-wide peak (`resource.getrusage`) is all there is, and it is reported as such.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import resource
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

_MIB = 2**20


def peak_rss_mib() -> float | None:
    """The process's resident high-water mark (Linux's VmHWM) in MiB; None where the OS does not report it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux: 5 into /proc/self/clear_refs); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed() -> None:
    """Give the memory the C allocator holds as free back to the OS (glibc's `malloc_trim`; elsewhere nothing).

    Why: glibc keeps freed blocks below its mmap threshold in its heaps, so what a stage freed stays resident and
    counts against the next one: z-optimisation's activations left 650 MiB of a 0.4B model's edit resident after
    the optimisation ended (benchmarks/RESULTS.md, 5.2)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def available_mib() -> float | None:
    """Memory the OS could give this process now without swapping (Linux's MemAvailable), MiB; None elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_peak_mib() -> float:
    """The process's peak RSS so far, in MiB (ru_maxrss: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024


@dataclass
class PeakMemory:
    """Peak memory of named stages, in MiB: `rss[stage]`, and `cuda[stage]` where CUDA was used.

    `per_stage` is False where the OS cannot reset the high-water mark: each figure is then the process's peak
    up to the end of that stage."""

    rss: dict[str, float] = field(default_factory=dict)
    cuda: dict[str, float] = field(default_factory=dict)
    per_stage: bool = True

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Measure the peak of the work inside; a stage seen twice keeps the larger peak. What earlier work freed is
        handed back to the OS first, so it does not count here."""
        release_freed()
        self.per_stage = reset_peak_rss() and self.per_stage
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            hwm = peak_rss_mib() if self.per_stage else None
            peak = hwm if hwm is not None else process_peak_mib()
            self.rss[name] = round(max(peak, self.rss.get(name, 0.0)), 1)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                used = torch.cuda.max_memory_allocated() / _MIB
                self.cuda[name] = round(max(used, self.cuda.get(name, 0.0)), 1)

    def at_least(self, name: str, mib: float | None) -> None:
        """Raise a stage's peak to `mib`: a peak measured inside it by a `PeakMemory` of its own, whose resets
        hid it from this one."""
        if mib is not None:
            self.rss[name] = round(max(mib, self.rss.get(name, 0.0)), 1)

    def to_json(self) -> dict:
        out: dict = {"peak_rss_mib": dict(self.rss), "per_stage": self.per_stage}
        if self.cuda:
            out["peak_cuda_mib"] = dict(self.cuda)
        return out
