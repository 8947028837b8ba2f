"""Shared by the GPU benchmarks: a log kept for the results folder, the timer (median of
``triton.testing.do_bench``, L2 flushed between runs; one plain timed call on the CPU smoke runs), and the
tag naming the device in result files (``kernels_h200.json``)."""
from __future__ import annotations

import re
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


def host_syncs(fn) -> dict[str, int]:
    """Where ``fn`` makes the host wait for the GPU: ``{"file:line function": count}`` of the innermost frame of
    this package that asked (CUDA's sync debug mode; it documents that it may miss some syncs)."""
    import traceback
    import warnings

    import torch
    found: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message) or "prototype" in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if "sglang_shplb" in f.filename]
        where = f"{ours[-1].filename.split('sglang_shplb/')[-1]}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
        found[where] = found.get(where, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def kernel_ms(fn, calls: int = 10) -> dict[str, float]:
    """Device milliseconds per call of each kernel ``fn`` launches (torch.profiler over ``calls`` calls after
    one warm-up call), largest first."""
    import torch
    from torch.profiler import ProfilerActivity
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kern = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    return {e.key[:60]: e.device_time_total / calls / 1e3 for e in kern}


def span_and_busy(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """``(last end - first start, length of the union)`` of ``(start, end)`` intervals sorted by start."""
    if not intervals:
        return 0.0, 0.0
    busy, end = 0.0, float("-inf")
    for a, b in intervals:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return end - intervals[0][0], busy


def device_gaps(fn, calls: int = 5) -> dict[str, float]:
    """``fn``'s device timeline as ``triton.testing.do_bench`` times it: the host ahead of the GPU (a queued sleep
    kernel gives it 25 ms to issue ``fn``) and the L2 flushed just before. Medians over ``calls`` of: ``span_ms``
    (first start to last end of ``fn``'s device work), ``busy_ms`` (the union of its kernels and copies) and
    ``gaps_ms`` (span - busy: the device idle inside ``fn`` though every launch was queued)."""
    import statistics

    import torch
    from torch.profiler import DeviceType, ProfilerActivity
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    out: dict[str, list[float]] = {"span_ms": [], "busy_ms": [], "gaps_ms": []}
    for _ in range(calls):
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda._sleep(50_000_000)
            flush.zero_()
            fn()
            torch.cuda.synchronize()
        ev = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
        span, busy = span_and_busy(ev[2:])    # the sleep and the flush come first
        out["span_ms"].append(span / 1e3)
        out["busy_ms"].append(busy / 1e3)
        out["gaps_ms"].append((span - busy) / 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


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


def flashinfer_or_none(smoke: bool):
    """FlashInfer (its version logged) for the competitor rows, or None on smoke runs or where it is missing."""
    if smoke:
        return None
    from sglang_shplb.kernels.flashinfer_wrappers import import_flashinfer
    try:
        fi = import_flashinfer()
    except ImportError as e:
        log(f"flashinfer unavailable: {e}")
        return None
    log(f"flashinfer {fi.__version__}")
    return fi


SMOKE_DEVICE = "cpu (Triton interpreter)"


def device_name(smoke: bool) -> str:
    """The device a benchmark runs on, as its results record it."""
    if smoke:
        return SMOKE_DEVICE
    import torch
    return torch.cuda.get_device_name()


def device_tag(name: str) -> str:
    """The device in result file names: ``smoke`` for a CPU run, else the first word of the GPU's name
    with a digit, lower case (``NVIDIA H100 80GB HBM3`` → ``h100``, ``NVIDIA A100-SXM4-80GB`` → ``a100``)."""
    if name.startswith("cpu"):
        return "smoke"
    words = re.split(r"[\s_-]+", name)
    word = next((w for w in words if any(c.isdigit() for c in w)), name)
    return re.sub(r"[^a-z0-9]", "", word.lower()) or "gpu"
