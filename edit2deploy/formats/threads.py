"""How many threads a deployment runtime (llama.cpp, onnxruntime) computes with.

Both spin their threads at every barrier, so a thread whose core another process holds stalls the rest: on 2 shared
cores, 2 llama.cpp threads ran a 10-token prompt 50× slower than 1. A runtime opened on its own (the Python API,
tests) therefore takes half the usable cores. A runtime that is the only work of its process while it runs — a
run's verification, the statistics corpus's sampling — takes them all: on 2 idle cores, 2 threads generate and score
1.7× faster than 1 (benchmarks/RESULTS.md, 2.5). `OMP_NUM_THREADS`, when set, decides both.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _from_env() -> int | None:
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def shared_threads() -> int:
    """Threads for a runtime that may share the machine: half the usable cores (at least 1)."""
    return _from_env() or max(1, usable_cores() // 2)


def exclusive_threads() -> int:
    """Threads for a runtime that is the only work running while it lasts: every usable core."""
    return _from_env() or usable_cores()
