"""Shared by the GPU benchmarks: a log kept for the results folder, and the timer (median of
``triton.testing.do_bench``, L2 flushed between runs; one plain timed call on the CPU smoke runs)."""
from __future__ import annotations

import time

LOG: list[str] = []


def log(*a) -> None:
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def bench(fn, smoke: bool, rep_ms: int = 200) -> float:
    """Median milliseconds."""
    if smoke:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def results_writer(res: dict, path: str):
    """``dump()``: write ``res`` to ``path.json`` and the log so far to ``path.log`` (called after each step
    of a benchmark, so that a run cut short still leaves its numbers)."""
    import json

    def dump() -> None:
        with open(path + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(path + ".log", "w") as f:
            f.write("\n".join(LOG) + "\n")
    return dump
