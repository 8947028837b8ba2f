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
