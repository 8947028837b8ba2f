"""Budget selection: tau mode and the max-min density-target allocator, on synthetic profiles."""
import itertools
import json

import numpy as np
import pytest
import torch

from sglang_shplb.planning.budget import (BudgetsFile, BudgetsFileError, budgets_by_density_target, budgets_by_tau,
                                          choose_budgets, load_budgets, option_table, save_budgets, stability)
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.planning.profile import Option, ProfileResult
from sglang_shplb.core.patterns import HeadBudget


def _profile(recall_a: np.ndarray, recall_b: np.ndarray | None = None, lengths=(2048, 8192),
             qrecall: np.ndarray | None = None, nmass: np.ndarray | None = None,
             nrecall: np.ndarray | None = None) -> ProfileResult:
    """Synthetic profile; question recall equals the recall unless given, no needle mass unless given (the
    same for both sets)."""
    opts = [Option("dense", HeadBudget.dense()),
            Option("streaming", HeadBudget.streaming(64, 256)),
            Option("topk", HeadBudget.topk(0.1, 2)),
            Option("topk", HeadBudget.topk(0.3, 2)),
            Option("topk_oracle", HeadBudget.topk(0.05, 2))]
    L, H, _ = recall_a.shape
    res = ProfileResult(opts, list(lengths), L, H)
    for n in lengths:
        res.recall[("A", n)] = torch.tensor(recall_a, dtype=torch.float32)
        res.err[("A", n)] = torch.tensor(1 - recall_a, dtype=torch.float32)
        res.qrecall[("A", n)] = torch.tensor(recall_a if qrecall is None else qrecall, dtype=torch.float32)
        for s in ("A", "B") if recall_b is not None else ("A",):
            res.nmass[(s, n)] = torch.zeros(L, H) if nmass is None else torch.tensor(nmass, dtype=torch.float32)
            res.nrecall[(s, n)] = torch.ones(L, H, len(opts)) if nrecall is None else \
                torch.tensor(nrecall, dtype=torch.float32)
        if recall_b is not None:
            res.recall[("B", n)] = torch.tensor(recall_b, dtype=torch.float32)
            res.err[("B", n)] = torch.tensor(1 - recall_b, dtype=torch.float32)
            res.qrecall[("B", n)] = torch.tensor(recall_b if qrecall is None else qrecall, dtype=torch.float32)
    return res


def _random_recall(rng, L, H):
    r = np.sort(rng.uniform(0.5, 1.0, size=(L, H, 4)), axis=-1)[..., ::-1]  # streaming < topk .1 < .3 ...
    r = np.concatenate([np.ones((L, H, 1)), r[..., [3, 2, 1]], rng.uniform(0.9, 1.0, (L, H, 1))], -1)
    return r


def test_tau_picks_cheapest_option_meeting_tau():
    rng = np.random.default_rng(0)
    prof = _profile(_random_recall(rng, 3, 4))
    res = budgets_by_tau(prof, 0.8)
    opts, dens, worst = option_table(prof)
    assert all(o.deployable for o in opts)  # the oracle never becomes a budget
    for li in range(3):
        for h in range(4):
            ok = [j for j in range(len(opts)) if worst[li, h, j] >= 0.8]
            assert res.density[li, h] == pytest.approx(min(dens[j] for j in ok))
    assert res.min_recall >= 0.8


def test_worst_length_counts():
    r = np.full((1, 1, 5), 0.99)
    prof = _profile(r)
    prof.recall[("A", 2048)][0, 0, 1] = 0.5  # streaming fails at one length only
    res = budgets_by_tau(prof, 0.9)
    assert res.budgets[0][0].pattern.value != "streaming"


def test_density_target_is_max_min_optimal_by_brute_force():
    rng = np.random.default_rng(1)
    prof = _profile(_random_recall(rng, 1, 4))
    opts, dens, worst = option_table(prof)
    for target in (0.25, 0.4, 0.6, 0.9):
        if dens[np.argmin(np.where(True, dens, 0))] > target:
            continue
        res = budgets_by_density_target(prof, target)
        assert res.mean_density <= target + 1e-9
        best = max((min(worst[0, h, c[h]] for h in range(4))
                    for c in itertools.product(range(len(opts)), repeat=4)
                    if np.mean([dens[c[h]] for h in range(4)]) <= target + 1e-9), default=None)
        assert res.min_recall == pytest.approx(best)


def test_density_target_below_floor_is_refused():
    prof = _profile(np.full((2, 2, 5), 0.9))
    with pytest.raises(ValueError, match="below the cheapest"):
        budgets_by_density_target(prof, 1e-4)


def test_stability_detects_agreement_and_disagreement():
    rng = np.random.default_rng(2)
    r = _random_recall(rng, 6, 6)
    same = stability(_profile(r, r.copy()), tau=0.8)
    assert same.spearman == pytest.approx(1.0) and same.same_family == 1.0
    shuffled = r.reshape(36, -1)[rng.permutation(36)].reshape(r.shape)
    other = stability(_profile(r, shuffled), tau=0.8)
    assert other.spearman < 0.9


def test_budgets_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    r = _random_recall(rng, 2, 3)
    prof = _profile(r, r.copy())
    prof.model = {**ModelSpec("LlamaForCausalLM", 2, 3, 1, 64, 8192, "t").to_dict(), "checkpoint": "/models/m"}
    res = choose_budgets(prof, 0.8)
    assert res.mode == "tau=0.8, needle rows"
    assert choose_budgets(prof, 0.8, density_target=0.9, rows="all").mode == "density<=0.9, all rows"
    path = save_budgets(BudgetsFile.of(prof, res, 0.8, stability(prof, 0.8)), tmp_path)
    back = load_budgets(tmp_path)
    assert path.name == "budgets.json" and back.budgets == res.budgets and back.mode == res.mode
    assert back.spec.num_heads == 3 and back.model["checkpoint"] == "/models/m"
    assert back.stability.spearman == pytest.approx(1.0)
    np.testing.assert_allclose(back.density, res.density, atol=1e-5)
    np.testing.assert_allclose(back.recall, res.recall, atol=1e-5)
    (tmp_path / "other.json").write_text(json.dumps({"schema": "shplb-profile/1"}))
    with pytest.raises(BudgetsFileError, match="not a budgets file"):
        load_budgets(tmp_path / "other.json")


def test_question_rows_keep_a_retrieval_head_that_all_rows_would_stream():
    # head (0, 0): streaming keeps 0.97 of all rows' mass but 0.3 of the question rows' (it misses the needle)
    recall = np.array([[[1.0, 0.97, 0.96, 0.99, 1.0], [1.0, 0.97, 0.96, 0.99, 1.0]]])
    qrecall = recall.copy()
    qrecall[0, 0, 1:4] = [0.3, 0.5, 0.8]
    prof = _profile(recall, recall, qrecall=qrecall)
    on_all = budgets_by_tau(prof, 0.95, rows="all")
    on_question = budgets_by_tau(prof, 0.95, rows="question")
    assert [b.pattern.value for b in on_all.budgets[0]] == ["streaming", "streaming"]
    assert on_question.budgets[0][0].pattern.value == "dense" and on_question.budgets[0][1] == on_all.budgets[0][1]
    assert on_question.recall[0, 0] == 1.0 and "question rows" in on_question.mode
    # at a density target the allocator spends the density on the head whose question rows need it
    tight = budgets_by_density_target(prof, float(on_question.density.mean()))
    assert tight.budgets[0][0].pattern.value == "dense"
    with pytest.raises(ValueError, match="rows"):
        option_table(prof, rows="some")


def test_a_profile_without_question_recall_is_refused_unless_all_rows_are_asked():
    prof = _profile(np.ones((1, 2, 5)))
    prof.qrecall.clear()
    with pytest.raises(ValueError, match="needle-row recall"):
        budgets_by_tau(prof)
    with pytest.raises(ValueError, match="question-row recall"):
        budgets_by_tau(prof, rows="question")
    assert budgets_by_tau(prof, rows="all").mode == "tau=0.95, all rows"


def test_stability_of_needs_that_do_not_vary_is_nan_without_a_warning():
    import warnings

    prof = _profile(np.ones((2, 3, 5)), np.ones((2, 3, 5)))  # every head streams on both sets
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = stability(prof, 0.9)
    assert np.isnan(st.spearman) and np.isnan(st.pvalue) and st.same_family == 1.0


def test_needle_recall_counts_as_much_as_the_head_looks_at_the_needle():
    recall = np.ones((1, 3, 5))
    recall[..., 1] = 0.97  # streaming keeps 0.97 of every head's mass, all rows and question rows alike
    nrecall = np.ones((1, 3, 5))
    nrecall[..., 1] = 0.0  # ... and none of the needle
    nmass = np.array([[0.5, 0.05, 0.001]])  # a retrieval head, a head that glances at it, one that does not
    prof = _profile(recall, recall, nmass=nmass, nrecall=nrecall)
    _, _, worst = option_table(prof)
    np.testing.assert_allclose(worst[0, :, 1], [0.0, 0.5, 0.97], atol=1e-6)  # min(0.97, 1 - min(1, m/0.1))
    got = budgets_by_tau(prof, 0.95)
    assert [b.pattern.value for b in got.budgets[0]] == ["topk", "topk", "streaming"]  # top-k keeps the needle
    assert [b.pattern.value for b in budgets_by_tau(prof, 0.95, rows="question").budgets[0]] == ["streaming"] * 3
    _, _, loose = option_table(prof, needle_scale=1.0)  # a larger scale holds fewer heads to their needle
    np.testing.assert_allclose(loose[0, :, 1], [0.5, 0.95, 0.97], atol=1e-6)
    with pytest.raises(ValueError, match="needle_scale"):
        option_table(prof, needle_scale=0)


def test_topk_floor_lifts_topk_options_only_and_is_kept_in_the_budgets():
    from sglang_shplb.core.patterns import Pattern
    from sglang_shplb.planning.budget import topk_floor

    rng = np.random.default_rng(3)
    prof = _profile(_random_recall(rng, 4, 6))
    opts, dens, worst = option_table(prof)
    lifted, ldens, lworst = option_table(prof, topk_min_blocks=16)
    for o, lo, d, ld in zip(opts, lifted, dens, ldens):
        if o.budget.pattern is Pattern.TOPK:
            assert lo.budget.min_blocks == 16 and lo.budget.fraction == o.budget.fraction and ld > d
        else:
            assert lo == o and ld == d
    assert (lworst == worst).all()  # the profiled recall: a lower bound of the floored option's
    res = budgets_by_density_target(prof, 0.5, topk_min_blocks=16)
    assert res.mean_density <= 0.5 + 1e-9 and res.mode.endswith("top-k >= 16 blocks")
    tops = [b for row in res.budgets for b in row if b.pattern is Pattern.TOPK]
    assert tops and all(b.min_blocks == 16 for b in tops) and topk_floor(res.budgets) == 16
    assert topk_floor([[HeadBudget.dense(), HeadBudget.streaming(64, 256)]]) == 0
    assert "top-k" not in budgets_by_tau(prof, 0.9).mode
