"""Context-length buckets: powers of two, looked up in O(1).

Bucket ``i`` holds lengths in ``(edges[i-1], edges[i]]``; lengths at or below the first edge fall in
bucket 0 and lengths above the last edge in the last bucket (its plan is the most conservative one
solved). Edges must be powers of two so that the lookup is one ``int.bit_length``.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_EDGES = (4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class Buckets:
    edges: tuple[int, ...] = DEFAULT_EDGES

    def __post_init__(self) -> None:
        e = self.edges
        if not e:
            raise ValueError("at least one bucket edge is needed")
        for a in e:
            if a < 1 or a & (a - 1):
                raise ValueError(f"bucket edges must be powers of two, got {a}")
        for a, b in zip(e, e[1:]):
            if b != 2 * a:
                raise ValueError(f"bucket edges must double one after another, got {a} then {b}")
        object.__setattr__(self, "_first_log", e[0].bit_length() - 1)

    def __len__(self) -> int:
        return len(self.edges)

    def index(self, length: int) -> int:
        """Bucket of a context length: ceil(log2(length)) - log2(edges[0]), clamped. O(1)."""
        if length <= self.edges[0]:
            return 0
        i = (length - 1).bit_length() - self._first_log
        return i if i < len(self.edges) else len(self.edges) - 1

    def upper(self, i: int) -> int:
        return self.edges[i]

    def lower(self, i: int) -> int:
        return 1 if i == 0 else self.edges[i - 1] + 1
