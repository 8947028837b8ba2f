"""bench/eval_frontier.py: the card a frontier plot is named after, and the first density that loses."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import eval_frontier as ef  # noqa: E402

from sglang_shplb.evaluation.runner import accelerator_name  # noqa: E402


def test_card_tag_from_the_recorded_accelerator():
    assert ef.card_tag({"device": "cuda", "accelerator": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert ef.card_tag({"device": "cuda", "accelerator": "NVIDIA H200"}) == "h200"
    assert ef.card_tag({"device": "cuda"}) == "h200"          # evals before the record: all ran on an H200
    assert ef.card_tag({"device": "cpu", "accelerator": accelerator_name("cpu")}) == "cpu"
    assert accelerator_name("cpu")


def test_first_loss_is_the_highest_losing_density():
    rows = [{"method": "m", "task": "passkey", "density": d, "loses": lose}
            for d, lose in [(0.2, True), (0.25, True), (0.3, False)]]
    rows.append({"method": "m", "task": "qa", "density": 0.2, "loses": False})
    assert ef.first_loss(rows, "m") == {"passkey": 0.25, "qa": None}


def test_method_of_groups_plans_named_apart():
    assert ef.method_of("needle_d20", {}) == "needle" and ef.method_of("all_tau95", {}) == "all"
    assert ef.method_of("cpu10_d25", {"cpu10_d25": "refined"}) == "refined"
    assert ef.method_of("cpu9_d30", {"cpu10_d25": "refined"}) == "cpu9"
