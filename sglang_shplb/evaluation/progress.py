"""Answers kept as they come, so that an eval stopped midway (a killed server, a lost machine) picks up
where it stopped when run again.

Each answer is one line of ``eval_progress.jsonl`` in the output folder, under a key that hashes what
decides it: the server's command line, for the sparse server the plan file's contents, the prompt's
tokens and the answer length. A run reuses the answers whose key it would ask for and removes the
file once ``eval.json`` is written.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

PROGRESS_NAME = "eval_progress.jsonl"


def answer_key(command: list[str], plan_digest: str | None, input_ids: list[int], max_new_tokens: int) -> str:
    return hashlib.sha256(json.dumps([command, plan_digest, input_ids, max_new_tokens]).encode()).hexdigest()


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
