"""What a torch-profiler trace (Chrome JSON, as SGLang's ``/start_profile`` writes it) says about where a server's
time went: GPU busy against idle, the longest idle gaps and the kernels around them, the kernels, runtime calls and
CPU ops that took the most time. Two servers' summaries of the same requests tell kernel time from host time
(a report, never a test threshold).

    python bench/trace_summary.py TRACE.json[.gz] [TRACE ...]       # one JSON summary per trace, on stdout
"""
from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

TOP = 12
GAP_MS = 0.05          # idle stretches shorter than this count as idle but are not listed


def load_trace(path: Path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    """The union of ``[ts, ts + dur)`` over ``events`` (µs), sorted and merged: time some GPU stream ran a kernel."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events)
    merged: list[list[float]] = []
    for s, t in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], t)
        else:
            merged.append([s, t])
    return [(s, t) for s, t in merged]


def top_by_time(events: list[dict], n: int = TOP) -> list[dict]:
    """Per event name: count and total ms, the ``n`` largest totals first."""
    tot: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        tot[e["name"]][0] += 1
        tot[e["name"]][1] += e.get("dur", 0) / 1e3
    rows = sorted(tot.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": k[:100], "count": c, "ms": round(ms, 3)} for k, (c, ms) in rows]


def gpu_stats(kernels: list[dict]) -> dict:
    """GPU kernels (sorted by start): their number, busy / span / idle ms between the first one's start and the last
    one's end, how many idle gaps pass 0.05 / 0.5 / 2 ms, and the longest ones with the kernels before and after."""
    busy = busy_intervals(kernels)
    out: dict = {"kernels": len(kernels)}
    if not busy:
        return out
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(t - s for s, t in busy)
    gaps = [(busy[i + 1][0] - busy[i][1], busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    long = sorted((g for g in gaps if g[0] >= GAP_MS * 1e3), reverse=True)[:TOP]
    ends = {round(e["ts"] + e.get("dur", 0), 3): e["name"] for e in kernels}
    starts: dict[float, str] = {}
    for e in kernels:
        starts.setdefault(e["ts"], e["name"])
    out.update(span_ms=round(span / 1e3, 3), busy_ms=round(busy_us / 1e3, 3), idle_ms=round((span - busy_us) / 1e3, 3),
               idle_gaps_over_ms={str(x): sum(1 for g in gaps if g[0] >= x * 1e3) for x in (0.05, 0.5, 2.0)},
               longest_gaps=[{"ms": round(g / 1e3, 3), "at_ms": round((at - busy[0][0]) / 1e3, 3),
                              "after": ends.get(round(at, 3), "?")[:60], "before": starts.get(nxt, "?")[:60]}
                             for g, at, nxt in long])
    return out


def summarize(trace: dict, window_ms: float | None = None) -> dict:
    """Summary of one trace: ``gpu`` (:func:`gpu_stats` of every kernel), with ``window_ms`` also ``window`` (those
    starting within that many ms of the first: e.g. a batch's prefill, up to its last first token), ``kernels``,
    ``runtime`` (CUDA runtime calls: a long ``cudaStreamSynchronize`` or ``cudaMemcpyAsync`` is the host waiting on
    the device) and ``cpu_ops``, each the largest totals first."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "ts" in e]
    kernels = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    out = {"gpu": gpu_stats(kernels)}
    if window_ms is not None and kernels:
        t0 = kernels[0]["ts"]
        out["window"] = {"ms": window_ms, **gpu_stats([e for e in kernels if e["ts"] < t0 + window_ms * 1e3])}
    return {**out, "kernels": top_by_time(kernels),
            "runtime": top_by_time([e for e in ev if e.get("cat") == "cuda_runtime"]),
            "cpu_ops": top_by_time([e for e in ev if e.get("cat") == "cpu_op"])}


def main(argv: list[str]) -> None:
    for p in argv:
        print(json.dumps({"trace": p, **summarize(load_trace(Path(p)))}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
