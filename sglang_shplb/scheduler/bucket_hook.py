"""Bucket of a batch, attached to SGLang's ForwardBatch, plus the bucket histogram and the prefill
grouping policy; and, for an extend batch, which of its requests end their prompt (:func:`prompt_ends`, kept for
the backend: :func:`batch_prompt_ends`).

Rule (documented in docs/serving.md): a batch's bucket is the bucket of its LONGEST context
(``max(seq_lens)``, the prefix and the new tokens included): a mixed batch runs the plan of its longest
request, the most conservative plan of the buckets present. The lookup is :meth:`Buckets.index`, O(1)
(one ``bit_length``) on the maximum, which SGLang's ScheduleBatch already holds on the host
(``seq_lens_cpu``); no device sync.

This module imports no SGLang at import time: :func:`install_hooks` registers the HookRegistry hooks.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Iterable, Sequence

from sglang_shplb.core.buckets import Buckets

logger = logging.getLogger(__name__)

ATTR = "shplb_bucket"


def batch_bucket(buckets: Buckets, seq_lens: Iterable[int] | None, max_len: int | None = None) -> int:
    """Bucket of a batch: that of its longest context. ``max_len`` short-cuts the max when known."""
    if max_len is None:
        if seq_lens is None:
            return 0
        if hasattr(seq_lens, "max"):
            if len(seq_lens) == 0:
                return 0
            max_len = int(seq_lens.max())
        else:
            seq_lens = list(seq_lens)
            if not seq_lens:
                return 0
            max_len = max(int(x) for x in seq_lens)
    return buckets.index(max_len)


def prompt_ends(reqs: Sequence) -> tuple[bool, ...] | None:
    """Per request of an extend batch (SGLang 0.5.17's ``Req``), whether this extend ends its prompt: its extend
    range reaches the end of its fill ids (the prompt, and the outputs of a retracted request). False only for the
    earlier chunks of a chunked prefill, which SGLang's ``PrefillAdder`` truncates; a decode request mixed into an
    extend batch extends to its end. None when a request lacks those fields (another SGLang): unknown."""
    out = []
    for req in reqs:
        rng, ids = getattr(req, "extend_range", None), getattr(req, "full_untruncated_fill_ids", None)
        if rng is None or ids is None:
            return None
        out.append(rng.end >= len(ids))
    return tuple(out)


class BucketStats:
    """Histogram of batch buckets in this process; logged every ``log_every`` batches and exported as the
    Prometheus counter ``sglang:shplb_bucket_batches_total{bucket=...}`` when SGLang's metrics are on."""

    def __init__(self, buckets: Buckets, log_every: int = 200):
        self.buckets = buckets
        self.log_every = log_every
        self.hist: Counter[int] = Counter()
        self.n = 0
        self._lock = threading.Lock()
        self._counter = None

    def enable_metrics(self) -> None:
        try:
            from prometheus_client import Counter as PCounter
            self._counter = PCounter("sglang:shplb_bucket_batches", "Batches per shplb context bucket",
                                     ["bucket", "upper"])
        except Exception as e:  # metrics are best effort; never break serving
            logger.warning("shplb: bucket metrics unavailable: %s", e)

    def record(self, bucket: int, mode: str = "") -> None:
        with self._lock:
            self.hist[bucket] += 1
            self.n += 1
            n = self.n
        if self._counter is not None:
            self._counter.labels(bucket=str(bucket), upper=str(self.buckets.upper(bucket))).inc()
        if self.log_every and n % self.log_every == 0:
            logger.info("shplb bucket histogram after %d batches: %s", n, self.format())

    def format(self) -> str:
        return ", ".join(f"<= {self.buckets.upper(b)}: {c}" for b, c in sorted(self.hist.items()))


_STATE: dict = {"buckets": None, "stats": None, "group_prefill": False, "prompt_ends": None}


def state() -> dict:
    return _STATE


def configure_buckets(buckets: Buckets, log_every: int = 200, group_prefill: bool = False,
                      metrics: bool = False) -> BucketStats:
    stats = BucketStats(buckets, log_every)
    if metrics:
        stats.enable_metrics()
    _STATE.update(buckets=buckets, stats=stats, group_prefill=group_prefill)
    return stats


def batch_prompt_ends(seq_lens: Sequence[int]) -> tuple[bool, ...] | None:
    """:func:`prompt_ends` of the extend batch of these host sequence lengths, the last one the hook saw in this
    process (a TP worker builds a ForwardBatch and runs it before the next), else None (unknown)."""
    kept = _STATE["prompt_ends"]
    return kept[1] if kept is not None and kept[0] == tuple(seq_lens) else None


# ---- HookRegistry hooks ---------------------------------------------------------------------------
def after_forward_batch_init_new(result, cls=None, batch=None, *args, **kwargs):
    """AFTER hook on the classmethod ``ForwardBatch.init_new(batch, model_runner, ...)``: attach the
    batch's bucket to the ForwardBatch it returns, and for an extend batch keep :func:`prompt_ends` with its host
    sequence lengths (:func:`batch_prompt_ends`). SGLang 0.5.17's eager runner hands the backend a
    ``dataclasses.replace`` copy of the ForwardBatch, which drops attributes set here; the backend's bucket falls
    back to the same rule on the copy's host lengths (``ShplbAttnBackend._bucket``)."""
    batch = kwargs.get("batch", batch)
    buckets = _STATE["buckets"]
    if buckets is None or result is None:
        return None
    seq_lens_cpu = getattr(batch, "seq_lens_cpu", None)
    b = batch_bucket(buckets, seq_lens_cpu) if seq_lens_cpu is not None else 0
    setattr(result, ATTR, b)
    mode, reqs = getattr(batch, "forward_mode", None), getattr(batch, "reqs", None)
    if mode is not None and mode.is_extend() and reqs is not None and seq_lens_cpu is not None:
        ends = prompt_ends(reqs)
        _STATE["prompt_ends"] = None if ends is None else (tuple(seq_lens_cpu.tolist()), ends)
    stats = _STATE["stats"]
    if stats is not None and len(seq_lens_cpu if seq_lens_cpu is not None else ()) > 0:
        stats.record(b)
    return None


def group_by_bucket(waiting_queue: list, buckets: Buckets) -> None:
    """Stable in-place reorder: requests in the bucket of the first (highest-priority) request first, so a
    prefill batch drawn from the front shares one bucket. O(n) over the queue, O(1) per request."""
    if len(waiting_queue) < 2:
        return
    def length(req):
        return len(getattr(req, "origin_input_ids", ()) or ()) + len(getattr(req, "output_ids", ()) or ())
    head = buckets.index(length(waiting_queue[0]))
    same, other = [], []
    for r in waiting_queue:
        (same if buckets.index(length(r)) == head else other).append(r)
    waiting_queue[:] = same + other


def after_calc_priority(result, policy_self=None, waiting_queue=None, *args, **kwargs):
    """AFTER hook on ``SchedulePolicy.calc_priority(waiting_queue, ...)``: the group-by-bucket policy."""
    waiting_queue = kwargs.get("waiting_queue", waiting_queue)
    if _STATE["group_prefill"] and _STATE["buckets"] is not None and waiting_queue is not None:
        group_by_bucket(waiting_queue, _STATE["buckets"])
    return None


FORWARD_BATCH_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
CALC_PRIORITY_TARGET = "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority"


def install_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(FORWARD_BATCH_TARGET, after_forward_batch_init_new, HookType.AFTER)
    HookRegistry.register(CALC_PRIORITY_TARGET, after_calc_priority, HookType.AFTER)
