"""The CLI end to end on the real embedded model, truncated to two layers, with short prompts."""
import json
import shutil
import subprocess
import sys

import pytest

from sglang_shplb.cli import build_parser, main
from sglang_shplb.core.model_spec import ModelSpec
from sglang_shplb.planning.model_store import default_checkpoint
from sglang_shplb.core.plan import PlanModelMismatchError, load_plan


def _run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "sglang_shplb", *args], capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.mark.parametrize("cmd", ["plan", "profile", "budget", "place", "report"])
def test_help(cmd):
    out = _run(cmd, "--help").stdout
    assert "--out" in out


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    # 512-token prompts cannot meet the default density target (0.2): the tau rule, and refine skips itself
    r = _run("plan", "--num-layers", "2", "--lengths", "256", "512", "--tau", "0.95", "--tp", "2", "4", "8",
             "--buckets", "4096", "8192", "--eval-lengths", "512", "--eval-prompts", "1", "--out", str(out))
    return out, r.stdout


def test_plan_end_to_end(planned):
    out, stdout = planned
    assert "refine skipped: the budgets' mean density" in stdout   # tau 0.95 at 512 tokens is above 0.25
    for name in ("profile.json", "budgets.json", "plan.json", "plan.safetensors", "quality.json", "report.txt",
                 "budgets_heatmap.png", "gpu_loads_tp4.png", "elasticity_curves.png", "stability.png",
                 "speedup_by_bucket.png"):
        assert (out / name).stat().st_size > 0, name
    model = default_checkpoint()
    cfg = json.loads((model / "config.json").read_text())
    truncated = ModelSpec.from_config_dict(dict(cfg, num_hidden_layers=2))
    plan = load_plan(out, truncated, tp=8)
    assert plan.tp_sizes == [2, 4, 8] and len(plan.budgets) == 2 and len(plan.budgets[0]) == 9
    with pytest.raises(PlanModelMismatchError, match="num_layers"):
        load_plan(out, model)  # a plan of the 2-layer model is not a plan of the 30-layer one
    report = (out / "report.txt").read_text()
    for tp in (2, 4, 8):
        assert f"TP {tp}:" in report
    assert "stability (set A vs set B" in report and "contiguous" in report and "shplb" in report
    q = json.loads((out / "quality.json").read_text())
    assert abs(q[0]["tokens"] - 512) < 100 and isinstance(q[0]["top1_agree"], bool)


def test_stages_one_by_one(planned, tmp_path):
    out, _ = planned
    _run("budget", "--profile", str(out), "--density-target", "0.6", "--out", str(tmp_path))
    b = json.loads((tmp_path / "budgets.json").read_text())
    assert b["mode"] == "density<=0.6, needle rows, top-k >= 16 blocks"   # the default floor
    dens = [d for layer in b["density"] for d in layer]
    assert sum(dens) / len(dens) <= 0.6 + 1e-6
    r = _run("place", "--budgets", str(tmp_path), "--tp", "4", "--buckets", "4096", "--solver", "shplb_exact",
             "--out", str(tmp_path))
    assert load_plan(tmp_path).placements[4][0].solver == "shplb_exact"
    assert "TP 4, bucket 4096" in r.stderr and "proven optimal" in r.stdout and "Highs" not in r.stdout + r.stderr
    _run("report", "--plan", str(tmp_path), "--out", str(tmp_path / "rep"))
    assert "TP 4:" in (tmp_path / "rep" / "report.txt").read_text()


def test_bad_input(planned, tmp_path):
    out, _ = planned
    r = _run("place", "--budgets", str(out), "--max-replicated-kv", "lots", "--out", str(tmp_path), check=False)
    assert r.returncode != 0 and "must be a number" in r.stderr
    r = _run("profile", "--model", "/nonexistent", check=False)
    assert r.returncode == 2 and "no config.json" in r.stderr
    r = _run("budget", "--profile", str(out), "--density-target", "0.00001", "--out", str(tmp_path), check=False)
    assert r.returncode == 2 and "below the cheapest" in r.stderr
    r = _run("budget", "--profile", str(out), "--out", str(tmp_path), check=False)  # the default target, 512 tokens
    assert r.returncode == 2 and "below the cheapest" in r.stderr and "the tau rule" in r.stderr
    r = _run("budget", "--profile", str(out), "--tau", "0.9", "--density-target", "0.5", "--out", str(tmp_path),
             check=False)
    assert r.returncode != 0 and "two budget rules" in r.stderr
    r = _run("report", "--plan", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _run("place", "--buckets", "1000", "3000", "--budgets", str(out), check=False)
    assert r.returncode == 2 and "powers of two" in r.stderr


@pytest.mark.parametrize("cmd, option", [("budget", "--profile"), ("place", "--budgets"), ("report", "--plan"),
                                         ("profile", "--per-length"), ("profile", "--rows-per-block"),
                                         ("profile", "--sets"), ("plan", "--sets"), ("budget", "--out")])
def test_help_states_the_default(cmd, option):
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices[cmd]
    (action,) = [a for a in sub._actions if option in a.option_strings]
    assert "default" in action.help, action.help


@pytest.mark.parametrize("cmd, option, name, writer", [("budget", "--profile", "profile.json", "profile"),
                                                       ("place", "--budgets", "budgets.json", "budget"),
                                                       ("report", "--plan", "plan.json", "place")])
def test_missing_input_names_the_stage_and_file(cmd, option, name, writer, capsys):
    assert main([cmd, option, "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert f"/nonexistent/{name} does not exist" in err and f"the {writer} stage" in err and "Errno" not in err


def test_every_stage_writes_beside_its_input(planned, tmp_path, monkeypatch, capsys):
    """budget, place and report without --out write into their input's folder, and say where."""
    out, _ = planned
    folder, cwd = tmp_path / "mine", tmp_path / "cwd"
    folder.mkdir(), cwd.mkdir()
    for name in ("profile.json", "profile.safetensors"):
        shutil.copy(out / name, folder / name)
    monkeypatch.chdir(cwd)
    assert main(["budget", "--profile", str(folder), "--tau", "0.9"]) == 0
    assert main(["place", "--budgets", str(folder / "budgets.json"), "--tp", "2", "--buckets", "4096"]) == 0
    assert main(["report", "--plan", str(folder)]) == 0
    stdout = capsys.readouterr().out
    assert f"report and plots → {folder}" in stdout and "cannot check" in stdout
    for name in ("budgets.json", "plan.json", "report.txt", "gpu_loads_tp2.png"):
        assert (folder / name).exists(), name
    assert list(cwd.iterdir()) == []


def test_milp_output_is_silenced(capfd):
    """HiGHS writes some messages to the file descriptors directly, past ``disp=False``."""
    import os

    from sglang_shplb.planning.solvers.exact import _solver_output_silenced

    with _solver_output_silenced():
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution\n")
        os.write(2, b"HighsMipSolverData\n")
    os.write(1, b"after\n")
    out, err = capfd.readouterr()
    assert out == "after\n" and err == ""


def test_plan_defaults_to_the_measured_recipe():
    """No rule asked for: a density target, the top-k floor and refine (the recipe bench/results/eval_* measured);
    --tau switches to the recall rule, --no-refine skips refine."""
    from sglang_shplb.cli import budget_rule
    from sglang_shplb.planning.budget import DEFAULT_DENSITY_TARGET, DEFAULT_TAU, DEFAULT_TOPK_MIN_BLOCKS
    from sglang_shplb.planning.refine import DEFAULT_REFINE_TO

    a = build_parser().parse_args(["plan"])
    assert budget_rule(a) == (DEFAULT_TAU, DEFAULT_DENSITY_TARGET) and DEFAULT_DENSITY_TARGET < DEFAULT_REFINE_TO
    assert a.topk_min_blocks == DEFAULT_TOPK_MIN_BLOCKS and a.refine_to == DEFAULT_REFINE_TO and not a.no_refine
    assert budget_rule(build_parser().parse_args(["plan", "--tau", "0.9"])) == (0.9, None)
    assert budget_rule(build_parser().parse_args(["budget", "--density-target", "0.3"])) == (DEFAULT_TAU, 0.3)
    assert build_parser().parse_args(["plan", "--no-refine"]).no_refine
