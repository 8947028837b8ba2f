"""Haystack text of the eval prompts: the docstrings of a few standard-library packages.

Read from the installed sources with :mod:`ast` (nothing is imported or downloaded). The calibration
prompts of the profile use the language reference (``pydoc_data.topics``) instead; ``tests/test_eval.py``
checks that the two share no run of eight words. Paragraphs keep prose only: doctest lines, code-heavy
paragraphs and long digit runs (which could pass for a needle's value) are left out.
"""
from __future__ import annotations

import ast
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGES = ("email", "http", "json", "logging", "urllib", "xml", "concurrent", "asyncio", "unittest",
            "importlib", "multiprocessing")
#: a haystack unit (where a needle may go) has at most this many words: finer placement of the needles
UNIT_WORDS = 12
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[a-z]{4,10}$")


@dataclass(frozen=True)
class Corpus:
    paragraphs: tuple[tuple[str, ...], ...]  # each paragraph as its units, in reading order
    vocabulary: tuple[str, ...]              # sorted lowercase words of 4-10 letters


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                        ast.AsyncFunctionDef)))
    return [d for d in map(ast.get_docstring, nodes) if d]


def _prose(paragraph: str) -> str | None:
    lines = [ln for ln in paragraph.splitlines() if not ln.strip().startswith((">>>", "..."))]
    text = " ".join(" ".join(lines).split())
    if len(text.split()) < 8 or re.search(r"\d{5}", text):
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    return text if letters / len(text) > 0.85 else None


def _units(paragraph: str) -> tuple[str, ...]:
    out = []
    for sentence in _SENTENCE_END.split(paragraph):
        words = sentence.split()
        out += [" ".join(words[i:i + UNIT_WORDS]) for i in range(0, len(words), UNIT_WORDS)]
    return tuple(out)


@lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for pkg in PACKAGES for f in sorted((root / pkg).rglob("*.py"))
             if "test" not in f.relative_to(root).parts[1:-1]]
    paragraphs = [p for f in files for d in _docstrings(f) for p in map(_prose, d.split("\n\n")) if p]
    vocab = sorted({w for p in paragraphs for w in p.lower().split() if _WORD.match(w)})
    return Corpus(tuple(_units(p) for p in paragraphs), tuple(vocab))
