"""Which query heads of a layer this tensor-parallel rank computes: THE one place that maps plan heads to
rank-local heads. Today it is SGLang's contiguous slicing (rank r holds query heads
``[r * Hq / tp, (r + 1) * Hq / tp)`` and their KV heads); the head-parallel placement (next issue)
replaces :func:`rank_heads` and nothing else."""
from __future__ import annotations


def rank_heads(num_q_heads: int, tp_size: int, tp_rank: int, layer: int | None = None,
               bucket: int | None = None) -> list[int]:
    """Global query-head ids held by ``tp_rank``, in the rank's local order."""
    if num_q_heads % tp_size:
        raise ValueError(f"{num_q_heads} query heads do not split over TP {tp_size}")
    per = num_q_heads // tp_size
    return list(range(tp_rank * per, (tp_rank + 1) * per))
