"""Answers kept as they come, so that an eval stopped midway (a killed server, a lost machine) picks up
where it stopped when run again.

Each answer is one line of ``eval_progress.jsonl`` in the output folder, under a key that hashes what
decides it: the server's command line, the SGLang release, for the sparse server the plan file's contents and
this package's code (:func:`package_digest`: a changed decode rule changes answers that neither the command
line nor the plan shows), the prompt's tokens and the answer length. A run reuses the answers whose key it
would ask for and removes the file once ``eval.json`` is written.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

PROGRESS_NAME = "eval_progress.jsonl"


def answer_key(command: list[str], plan_digest: str | None, input_ids: list[int], max_new_tokens: int,
               software: str | None = None) -> str:
    """The key of one answer; ``software``: what else decides it (:func:`software_id`)."""
    return hashlib.sha256(json.dumps([command, plan_digest, input_ids, max_new_tokens, software]).encode()).hexdigest()


def package_digest(root: Path | None = None) -> str:
    """sha256 over the Python sources and JSON tables (the shipped launch configs) under ``root`` (default: this
    package), path by path."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.suffix in (".py", ".json") and "__pycache__" not in x.parts):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def software_id(with_package: bool) -> str:
    """The SGLang release a server runs, and for a ``shplb`` server this package's code (:func:`package_digest`)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        sglang = version("sglang")
    except PackageNotFoundError:
        sglang = "none"
    return f"sglang {sglang}" + (f", sglang_shplb {package_digest()}" if with_package else "")


@dataclass
class Progress:
    path: Path
    answers: dict[str, dict]

    @staticmethod
    def open(folder: Path) -> "Progress":
        path = Path(folder) / PROGRESS_NAME
        answers = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the last line of a run stopped while writing it
                    continue
                answers[rec["key"]] = rec["answer"]
        return Progress(path, answers)

    def add(self, key: str, answer: dict) -> None:
        self.answers[key] = answer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "answer": answer}) + "\n")

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)
