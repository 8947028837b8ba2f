"""Two routes of one decode layer inside a captured CUDA graph, chosen per replay by device flags.

SGLang captures one decode graph per batch size and replays it for every context length, so a layer that the
plan marks stock for decode in some buckets and sparse in others needs both routes in the graph. Captured into
CUDA conditional nodes (torch's ``CUDAGraph.begin_capture_to_if_node``, CUDA >= 12.4), each route's kernels
run only when its flag is set at replay: the stock route is the stock backend's own decode (FlashInfer), the
sparse route the kernel path, and neither pays for the other. Without conditional nodes the backend falls back
to the kernel path's route flag (:attr:`~sglang_shplb.kernels.paged_layer.LayerKernels.route`: the dense step
on the same Triton launches).

No SGLang import: :class:`DecodeBranches` holds the flags, :func:`captured_if` the capture.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch


def branches_supported() -> bool:
    """Whether this torch build captures conditional nodes (``CUDAGraph.begin_capture_to_if_node``)."""
    g = getattr(torch.cuda, "CUDAGraph", None)
    return g is not None and all(hasattr(g, a) for a in ("begin_capture_to_if_node", "end_capture_to_conditional_node",
                                                        "get_currently_capturing_graph"))


@contextmanager
def captured_if(pred: torch.Tensor) -> Iterator[None]:
    """Inside a stream capture: the kernels launched in the block run at replay only if ``pred`` (a bool CUDA
    scalar, read when the graph runs) is true."""
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()


def routed_layers(stock_by_bucket: Sequence[frozenset[int]], layers: Iterable[int]) -> frozenset[int]:
    """Of ``layers``, those stock for decode in some buckets but not in all (their route follows the bucket)."""
    always = frozenset.intersection(*stock_by_bucket) if stock_by_bucket else frozenset()
    some = frozenset().union(*stock_by_bucket) if stock_by_bucket else frozenset()
    return frozenset(li for li in layers if li in some and li not in always)


class DecodeBranches:
    """The flags of the routed layers: ``stock[li]`` / ``sparse[li]`` (bool CUDA scalars, exactly one true),
    rewritten per batch from the bucket (:meth:`set_bucket`, one device copy, never captured)."""

    def __init__(self, stock_by_bucket: Sequence[frozenset[int]], layers: Iterable[int], num_layers: int,
                 device) -> None:
        self.layers = frozenset(layers)
        table = torch.zeros(len(stock_by_bucket), 2, num_layers, dtype=torch.bool)
        for b, stock in enumerate(stock_by_bucket):
            for li in range(num_layers):
                table[b, 0 if li in stock else 1, li] = True
        self.by_bucket = table.to(device)
        self.flags = self.by_bucket[0].clone()

    def stock(self, li: int) -> torch.Tensor:
        return self.flags[0, li]

    def sparse(self, li: int) -> torch.Tensor:
        return self.flags[1, li]

    def set_bucket(self, bucket: int) -> None:
        self.flags.copy_(self.by_bucket[bucket])
