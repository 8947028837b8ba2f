"""The refine stage: gate sensitivities on the real (truncated) model, the greedy upgrade, the CLI."""
import json
import re
import subprocess
from dataclasses import replace
import sys

import numpy as np
import pytest
import torch

from sglang_shplb.core.patterns import HeadBudget
from sglang_shplb.planning import refine as rf
from sglang_shplb.planning.model_store import default_checkpoint, load_model

LAYERS = 2


def _run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "sglang_shplb", *args], capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def test_upgrade_spends_on_gain_per_density():
    dens = np.array([0.1, 0.4, 1.0])                       # options: cheap, middle, dense
    recall = np.tile(np.array([0.5, 0.9, 1.0]), (1, 3, 1))  # [L=1, H=3, O]
    choice = np.zeros((1, 3), dtype=int)
    sens = np.array([[0.0, 1.0, 3.0]])
    new = rf.upgrade(choice, dens, recall, sens, spend=0.9 / 3)  # 0.9 of total density: one dense upgrade
    assert new[0, 0] == 0                                   # no sensitivity, no upgrade
    assert new[0, 2] == 2 and new[0, 1] == 0                # the most sensitive head, its best ratio (dense)
    assert dens[new].sum() - dens[choice].sum() <= 0.9 + 1e-9
    assert (rf.upgrade(choice, dens, recall, sens, spend=0.0) == choice).all()
    # a head whose recall is already whole gains nothing from a denser option
    assert (rf.upgrade(choice, dens, np.ones_like(recall), sens, spend=1.0) == choice).all()
    # what fits: the cheapest upgrade adds (0.4 - 0.1) / 3 = 0.1 of mean density; a head at dense has none
    from sglang_shplb.planning.budget import upgrades_within
    assert not upgrades_within(choice, dens, 0.099)[1].any()
    assert upgrades_within(choice, dens, 0.1)[1].sum() == 3
    assert upgrades_within(np.array([[2, 2, 2]]), dens, 1.0)[1].sum() == 0
    assert (rf.upgrade(choice, dens, recall, sens, spend=0.099) == choice).all()


def test_option_choice_refuses_a_budget_of_another_profile():
    from sglang_shplb.planning.profile import default_options

    opts = default_options()
    with pytest.raises(ValueError, match="not one of the profile's options"):
        rf.option_choice([[HeadBudget.topk(0.123)]], opts)
    assert rf.option_choice([[opts[0].budget, opts[-1].budget]], opts).tolist() == [[0, len(opts) - 1]]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model, tok = load_model(default_checkpoint(), "cpu", LAYERS)
    held = rf.dense_answers(model, tok, rf.held_in_prompts(tok, [384], 2), max_new=4)
    return model, tok, held


def test_held_in_prompts_are_not_the_profiles(small):
    from sglang_shplb.planning.calibration_data import calibration_prompts

    _, tok, held = small
    profiled = calibration_prompts(tok, [384], "A", 2) + calibration_prompts(tok, [384], "B", 2)
    assert not {h.prompt.answer for h in held} & {p.answer for p in profiled}
    assert {h.prompt.name[0] for h in held} == {"A", "B"}


def test_held_in_prompts_ask_pass_keys_registers_facts_and_values(small):
    from sglang_shplb.planning.calibration_data import FACTS, VALUES, make_prompt

    _, tok, _ = small
    held = rf.held_in_prompts(tok, [384], 8)
    assert [len(p.input_ids) for p in held] == [384] * 8
    # pass key, pass key, register, register, fact, fact, values, values
    assert [len(p.name.split("-", 2)) for p in held] == [2, 2, 3, 3, 3, 3, 3, 3]
    assert all(p.name.endswith("-lighthouse") for p in held[4:6])
    for p in held[6:]:
        register = p.name.split("-", 2)[2].removesuffix("-values")   # "A1006-384-amber-42-values" -> "amber-42"
        text = tok.decode(p.input_ids)
        assert len(p.answers) == VALUES == len(set(p.answers)) and p.answer == ", ".join(p.answers)
        assert text.count(f"values of the register {register} is") == VALUES
        assert f"What are all the values of the register {register}?" in text
        needles = [tok.decode(p.input_ids[a:b]) for a, b in p.needles[:VALUES]]
        assert [n.rsplit(" ", 1)[1] for n in needles] == list(p.answers)    # its needles first, in order
        assert [a for a, _ in p.needles[:VALUES]] == sorted(a for a, _ in p.needles[:VALUES])
        assert all(register in n for n in needles) and len(p.needles) == VALUES + 4
        # all values named, in any wording; one missing or inside a longer number is not a reply
        a, b, c = p.answers
        assert rf.replied(p, f"The values are {c}, {a} and {b}.")
        assert not rf.replied(p, f"{a}, {b}") and not rf.replied(p, f"{a}, {b}, {c}7")
    # a chosen set of questions, cycled in pairs
    chosen = rf.held_in_prompts(tok, [384], 4, ("values", "passkey"))
    assert [p.name.endswith("-values") for p in chosen] == [True, True, False, False]
    # the values are added to the same document: its pass key and registers stay
    doc = tok.decode(make_prompt(tok, 384, "A", 1006, "values").input_ids)
    assert f"pass key is {make_prompt(tok, 384, 'A', 1006, 'passkey').answer}" in doc
    for p in held[2:4]:
        register = p.name.split("-", 2)[2]   # "A1002-384-amber-0" -> "amber-0"
        needle = tok.decode(p.input_ids[p.needles[0][0]:p.needles[0][1]])
        assert register.split("-")[0] in needle and p.answer in needle   # the asked register's needle first
        assert f"register {register}?" in tok.decode(p.input_ids)
    for p in held[4:6]:
        name = p.name.split("-")[2].capitalize()   # "A1004-384-amber-lighthouse" -> "Amber"
        text = tok.decode(p.input_ids)
        asked = tok.decode(p.input_ids[p.needles[0][0]:p.needles[0][1]])
        block = tok.decode(p.input_ids[p.needles[1][0]:p.needles[1][1]])
        assert name in asked and p.answer in asked and asked in block    # the asked fact first, inside its block
        assert block.count("lighthouse is painted") == FACTS and text.count("lighthouse is painted") == FACTS
        assert f"What colour is the {name} lighthouse painted?" in text and p.answer.isalpha()
        assert len(p.needles) == 2 + 4            # the fact, the block, the pass key and three registers
    # keepers: the same kind of block, the answer an invented name of several tokens, copied whole
    from sglang_shplb.planning.calibration_data import _KEEPER_SYLLABLES
    keepers = rf.held_in_prompts(tok, [384], 4, ("keepers",))
    assert len({p.answer for p in keepers}) == 4 and all(p.name.endswith("-keeper") for p in keepers)
    for p in keepers:
        name = p.name.split("-")[2].capitalize()   # "A1000-384-amber-keeper" -> "Amber"
        text = tok.decode(p.input_ids)
        asked = tok.decode(p.input_ids[p.needles[0][0]:p.needles[0][1]])
        block = tok.decode(p.input_ids[p.needles[1][0]:p.needles[1][1]])
        assert name in asked and p.answer in asked and asked in block and len(p.needles) == 2 + 4
        assert block.count("lighthouse is ") == FACTS and "painted" not in block
        assert len(set(re.findall(r"lighthouse is (\w+)\.", block))) == FACTS     # distinct keepers
        assert f"Who is the keeper of the {name} lighthouse?" in text
        assert re.fullmatch("(" + "|".join(_KEEPER_SYLLABLES) + "){2,3}", p.answer.lower())
        assert len(tok.encode(" " + p.answer, add_special_tokens=False)) >= 2
        assert rf.replied(p, f"The keeper is {p.answer}.") and not rf.replied(p, f"The keeper is {p.answer}ik.")
    # the fact list is added to the same document: its pass key stays
    key = make_prompt(tok, 384, "B", 1005, "passkey").answer
    assert f"pass key is {key}" in tok.decode(make_prompt(tok, 384, "B", 1005, "facts").input_ids)
    # the same document asked two ways: same needles (all of them), different answers
    a = make_prompt(tok, 384, "B", 1003, "passkey")
    b = make_prompt(tok, 384, "B", 1003, "register")
    assert a.answer != b.answer and sorted(a.needles) != [] and len(a.needles) == len(b.needles)
    with pytest.raises(ValueError, match="calibration question"):
        make_prompt(tok, 384, "A", 0, "capital")
    # too short for the needles: refused, never a prompt with a needle cut (384 tokens for seed 1005's facts)
    with pytest.raises(ValueError, match="too short for the 'facts' question"):
        make_prompt(tok, 384, "A", 1005, "facts")
    with pytest.raises(ValueError, match="too short"):
        make_prompt(tok, 100, "A", 0, "passkey")
    assert rf.answered("412", "It is 412.") and not rf.answered("412", "41234") and not rf.answered("412", "1412")
    assert rf.answered("teal", "Teal.") and not rf.answered("teal", "steal") and not rf.answered("teal", "teals")


def test_answer_budget_holds_each_questions_answer_sentence(small):
    from sglang_shplb.planning.calibration_data import QUESTIONS

    _, tok, _ = small
    assert set(rf.ANSWER_TOKENS) == set(QUESTIONS)
    for q in QUESTIONS:
        for p in rf.held_in_prompts(tok, [384], 2, (q,)):
            what = (p.name.split("-", 2) + [""])[2:]   # "A1002-384-amber-0" -> ["amber-0"]; a pass key [""]
            sentence = {"passkey": f"The pass key is {p.answer}.",
                        "register": f"The value of the register {what[0]} is {p.answer}.",
                        "facts": f"The {what[0].split('-')[0].capitalize()} lighthouse is painted {p.answer}.",
                        "keepers": f"The keeper of the {what[0].split('-')[0].capitalize()} lighthouse is {p.answer}.",
                        "values": f"The values of the register {what[0].removesuffix('-values')} are "
                                  f"{', '.join(p.answers[:-1])} and {p.answers[-1]}."}[q]
            assert p.question == q and rf.replied(p, sentence)
            assert len(tok.encode(sentence, add_special_tokens=False)) + 1 <= rf.ANSWER_TOKENS[q], sentence  # + EOS


def test_gate_is_zero_at_dense_and_matches_a_finite_difference(small):
    model, _, held = small
    dense = [[HeadBudget.dense()] * 9 for _ in range(LAYERS)]
    sens, loss = rf.gate_sensitivity(model, dense, held)
    assert loss < 1e-3 and sens.max() < 1e-3                # sparse == dense: nothing to gain
    stream = [[HeadBudget.streaming(64, 64)] * 9 for _ in range(LAYERS)]
    sens, loss = rf.gate_sensitivity(model, stream, held)
    assert loss > 1e-3 and sens.max() > 0
    # first order: opening the most sensitive head's gate by eps lowers the loss by about S * eps
    li, h = np.unravel_index(sens.argmax(), sens.shape)
    eps = 0.05
    alpha = torch.zeros(LAYERS, 9)
    alpha[li, h] = eps
    prompt = {}
    rf._register_gated(stream, alpha, prompt)
    model.set_attn_implementation(rf.GATED_NAME)
    moved = 0.0
    with torch.no_grad():
        for x in held:   # the answer rows by the decode rule, as gate_sensitivity has them
            prompt["len"] = len(x.prompt.input_ids)
            moved += float((x.dense_logprobs.exp() * (x.dense_logprobs - rf._answer_logprobs(
                model, x.prompt.input_ids, x.answer_ids))).sum())
    model.set_attn_implementation("sdpa")
    assert loss - moved == pytest.approx(sens[li, h] * eps, rel=0.3)


@pytest.fixture(scope="module")
def budgets_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine")
    _run("profile", "--num-layers", str(LAYERS), "--lengths", "256", "512", "--sets", "A", "--out", str(out))
    # 512 tokens are 8 blocks: the dense tail's row alone puts every head at 0.58 or more
    _run("budget", "--profile", str(out), "--density-target", "0.65", "--out", str(out))
    return out


def test_refine_stage_end_to_end(budgets_dir, tmp_path):
    r = _run("refine", "--budgets", str(budgets_dir), "--num-layers", str(LAYERS), "--density-target", "0.8",
             "--refine-step", "0.1", "--refine-prompts", "2", "--refine-lengths", "384", "--out", str(tmp_path))
    before = json.loads((budgets_dir / "budgets.json").read_text())
    after = json.loads((tmp_path / "budgets.json").read_text())
    mean = lambda d: float(np.mean(d["density"]))  # noqa: E731
    assert mean(before) <= 0.65 + 1e-6 < mean(after) <= 0.8 + 1e-6
    assert "refined to" in after["mode"] and after["model"] == before["model"]
    log = json.loads((tmp_path / "refine.json").read_text())
    assert len(log["rounds"]) >= 2 and log["rounds"][0]["upgraded"] == 0
    assert all(r2["upgraded"] > 0 for r2 in log["rounds"][1:])
    assert np.array(log["sensitivity"]).shape == (LAYERS, 9)
    assert "held-in" in r.stdout
    # the place stage takes the refined budgets
    _run("place", "--budgets", str(tmp_path), "--tp", "3", "--buckets", "4096", "--out", str(tmp_path))
    assert (tmp_path / "plan.json").is_file()


def test_refine_refuses_bad_input(budgets_dir, tmp_path):
    r = _run("refine", "--budgets", str(budgets_dir), "--num-layers", str(LAYERS), "--density-target", "0.7",
             "--out", str(budgets_dir), check=False)
    assert r.returncode == 2 and "never over" in r.stderr
    r = _run("refine", "--budgets", str(budgets_dir), "--num-layers", str(LAYERS), "--density-target", "0.1",
             "--refine-prompts", "1", "--refine-lengths", "384", "--out", str(tmp_path), check=False)
    assert r.returncode == 2 and "already above the target" in r.stderr
    r = _run("refine", "--budgets", str(budgets_dir), "--num-layers", "3", "--density-target", "0.7",
             "--refine-prompts", "1", "--refine-lengths", "384", "--out", str(tmp_path), check=False)
    assert r.returncode == 2 and "the model has" in r.stderr


def test_plan_refine_to_runs_the_stage_and_reports_it(tmp_path):
    r = _run("plan", "--num-layers", str(LAYERS), "--lengths", "256", "512", "--sets", "A", "--tp", "3",
             "--buckets", "4096", "--eval-lengths", "--density-target", "0.65", "--refine-to", "0.8",
             "--refine-prompts", "1", "--refine-lengths", "384", "--out", str(tmp_path))
    assert "[2b/5] refine" in r.stdout
    after = json.loads((tmp_path / "budgets.json").read_text())
    assert "refined to" in after["mode"] and 0.65 < float(np.mean(after["density"])) <= 0.8 + 1e-6
    assert (tmp_path / "refine.json").is_file()
    assert "budgets refined on answers (1 held-in prompts" in (tmp_path / "report.txt").read_text()


def test_refine_skips_a_round_for_a_sliver_of_density(small, budgets_dir, monkeypatch):
    from sglang_shplb.planning.budget import load_budgets
    from sglang_shplb.planning.profile import load_profile

    model, tok, held = small
    start, profile = load_budgets(budgets_dir), load_profile(budgets_dir)
    first = rf.refine_budgets(model, tok, start, profile, held, density_target=0.9, step=0.2,
                              log=lambda *_: None).rounds[0].density

    def no_pass(*_):
        raise AssertionError("a sensitivity pass for less than a tenth of a step")

    monkeypatch.setattr(rf, "gate_sensitivity", no_pass)
    lines = []
    res = rf.refine_budgets(model, tok, start, profile, held, density_target=first + 0.09 * 0.2, step=0.2,
                            log=lines.append)
    assert len(res.rounds) == 1 and "under 0.1 of a round's step" in lines[-1]
    with pytest.raises(AssertionError, match="tenth"):   # at a tenth of a step or more, the round runs
        rf.refine_budgets(model, tok, start, profile, held, density_target=first + 0.11 * 0.2, step=0.2,
                          log=lambda *_: None)


def test_refine_keeps_the_top_k_floor_of_its_budgets(small, budgets_dir, tmp_path):
    from sglang_shplb.core.patterns import Pattern
    from sglang_shplb.planning.budget import load_budgets, option_table
    from sglang_shplb.planning.profile import load_profile

    model, tok, held = small
    profile = load_profile(budgets_dir)
    start = load_budgets(budgets_dir)
    # top-k heads on options lifted to 6 blocks: refine must read the floor off the budgets
    opts, _, _ = option_table(profile, topk_min_blocks=6)
    topk = next(o.budget for o in opts if o.budget.pattern is Pattern.TOPK)
    start.budgets = [[replace(b, min_blocks=max(b.min_blocks, 6)) if b.pattern is Pattern.TOPK else b for b in row]
                     for row in start.budgets]   # the start's own top-k heads (if any) on the same floor
    start.budgets[0][0] = topk
    res = rf.refine_budgets(model, tok, start, profile, held, density_target=0.9, step=0.2, log=lambda *_: None)
    tops = [b for row in res.result.budgets for b in row if b.pattern is Pattern.TOPK]
    assert res.rounds[-1].density > res.rounds[0].density
    assert all(b.min_blocks == 6 for b in tops)
    start.budgets[0][0] = replace(topk, min_blocks=5)  # a floor the options cannot be lifted to match
    start.budgets[0][1] = topk
    with pytest.raises(ValueError, match="not one of the profile's options"):
        rf.refine_budgets(model, tok, start, profile, held, density_target=0.9, log=lambda *_: None)
    r = _run("budget", "--profile", str(budgets_dir), "--topk-min-blocks", "-1", "--out", str(tmp_path), check=False)
    assert r.returncode != 0 and "--topk-min-blocks" in r.stderr
