"""RULER's scoring: string match of the expected values in the answer, case-insensitive.

``all`` (RULER ``string_match_all``): the share of the refs found, so a multi-value answer with three
of four values scores 0.75. ``part`` (``string_match_part``): 1 when any ref is found. One change
from RULER's plain substring test: a ref must stand alone, not inside a longer word or number, so
"12345678" or "12345670" does not count for 1234567 and "mappings" does not count for "mapping".
Control characters in the answer become newlines first, as RULER's post-processing does.
"""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")


def _found(ref: str, answer: str) -> bool:
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(ref)}(?![0-9A-Za-z])", answer, re.IGNORECASE) is not None


def score(answer: str, refs: list[str], mode: str = "all") -> float:
    """The answer's score in [0, 1] under ``mode`` ``all`` or ``part``."""
    if not refs:
        raise ValueError("nothing to score against: no refs")
    answer = _CONTROL.sub("\n", answer).strip()
    hits = [_found(r, answer) for r in refs]
    if mode == "all":
        return sum(hits) / len(refs)
    if mode == "part":
        return float(any(hits))
    raise ValueError(f"scoring mode must be 'all' or 'part', got {mode!r}")
