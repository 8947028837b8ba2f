"""The eval's prompts, scorer, statistics and plan check, without servers (``test_eval_servers.py`` runs them).

Prompts are checked with the model's own tokenizer: deterministic, within 2 % of the target length, each
needle once at its stated depth (± 2 % of the context's tokens), nothing shared with the calibration prompts.
"""
import json
import re

import pytest
from pydoc_data.topics import topics
from transformers import AutoTokenizer

from serving_helpers import model_dir

from sglang_shplb.cli import build_parser, main
from sglang_shplb.core.plan import PlanModelMismatchError
from sglang_shplb.evaluation.corpus import load_corpus
from sglang_shplb.evaluation.progress import Progress, answer_key, package_digest, software_id
from sglang_shplb.evaluation.runner import EvalConfig, default_lengths, run_eval
from sglang_shplb.evaluation.scoring import score
from sglang_shplb.evaluation.summary import load_eval, paired_interval, plot_accuracy, summarize, summary_lines
from sglang_shplb.evaluation.tasks import DEPTHS, TASKS, common_word_frequency, eval_prompts, make_prompt
from sglang_shplb.planning import calibration_data
from sglang_shplb.planning.calibration_data import QUESTIONS, calibration_prompts, passkey_prompt
from sglang_shplb.planning.synthetic_plans import dense_budget, synthetic_plan

NEEDLE_TASKS = [t for t in TASKS if t != "cwe"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(model_dir())


@pytest.fixture(scope="module")
def prompts(tok):
    return eval_prompts(tok, list(TASKS), [1024, 3000], len(DEPTHS))


def _count(tok, ids: list[int], text: str) -> int:
    return tok.decode(ids).count(text)


def test_generators_are_deterministic(tok, prompts):
    for p in prompts[::7]:
        again = make_prompt(tok, p.task, p.length, p.index)
        assert again.input_ids == p.input_ids and again.refs == p.refs and again.needles == p.needles
    # and the seed matters: other index, other prompt
    assert make_prompt(tok, "passkey", 1024, 1).input_ids != make_prompt(tok, "passkey", 1024, 0).input_ids


def test_worker_processes_make_the_same_prompts_in_order(tok, prompts):
    calls = []
    some = [p for p in prompts if p.length == 1024 and p.task in ("passkey", "cwe", "qa")]
    par = eval_prompts(tok, ["passkey", "cwe", "qa"], [1024], len(DEPTHS), lambda: calls.append(1), workers=2)
    assert [p.input_ids for p in par] == [p.input_ids for p in some] and len(calls) == len(some)


def test_lengths_within_two_percent(prompts):
    for p in prompts:
        assert 0.98 * p.length <= len(p.input_ids) <= p.length, (p.name, len(p.input_ids))


def test_each_needle_once_at_its_stated_depth(tok, prompts):
    for p in (p for p in prompts if p.task in NEEDLE_TASKS):
        assert p.depth == DEPTHS[p.index % len(DEPTHS)] == p.needles[0].depth
        assert _count(tok, p.input_ids, p.context) == 1, p.name
        total = len(tok(p.context, add_special_tokens=False)["input_ids"])
        for n in p.needles:
            assert p.context.count(n.text) == 1 and _count(tok, p.input_ids, n.text) == 1, (p.name, n.text)
            before = len(tok(p.context[:p.context.index(n.text)], add_special_tokens=False)["input_ids"])
            assert abs(before / total - n.depth) <= 0.02, (p.name, n.text, before / total, n.depth)


def test_needles_carry_the_refs(tok, prompts):
    for p in (p for p in prompts if p.task in NEEDLE_TASKS):
        text = " ".join(n.text for n in p.needles)
        assert all(r in text for r in p.refs), p.name
        if p.task in ("passkey", "multikey", "multivalue"):  # a value is in the prompt once: in its needle
            assert all(_count(tok, p.input_ids, r) == 1 for r in p.refs), p.name
    multikey = next(p for p in prompts if p.task == "multikey")
    keys = {re.search(r"numbers for (\S+) is", n.text).group(1) for n in multikey.needles}
    assert len(keys) == 4  # the asked key and three distractors


def test_common_words_are_the_most_common(prompts):
    for p in (p for p in prompts if p.task == "cwe"):
        words = re.findall(r"\d+\. (\S+)", p.context)
        counts = {w: words.count(w) for w in set(words)}
        assert len(p.refs) == 10 and all(counts[w] == common_word_frequency(p.length) for w in p.refs)
        assert max(c for w, c in counts.items() if w not in p.refs) < common_word_frequency(p.length)


@pytest.mark.parametrize("answer, refs, mode, want", [
    (" 1234567.", ["1234567"], "all", 1.0),
    (" 1234568.", ["1234567"], "all", 0.0),            # one digit off
    (" 12345678", ["1234567"], "all", 0.0),            # an extra digit: the ref is not alone
    (" 123456", ["1234567"], "all", 0.0),              # truncated
    ("the number is\n1234567\x00", ["1234567"], "all", 1.0),
    ("1111111, 2222222 and 4444444", ["1111111", "2222222", "3333333", "4444444"], "all", 0.75),
    ("QWERT, ASDFG, zxcvb", ["QWERT", "ASDFG", "ZXCVB", "POIUY", "LKJHG"], "all", 0.6),  # case-insensitive
    ("QWERTY, ASDFG", ["QWERT", "ASDFG"], "all", 0.5),
    ("1. apples 2. pear", ["apple", "pear"], "all", 0.5),  # a plural is another word
    (" Kalobelford.", ["Kalobelford"], "part", 1.0),
    (" Kalobel", ["Kalobelford"], "part", 0.0),
    ("", ["1234567"], "all", 0.0),
])
def test_scorer_on_hand_made_answers(answer, refs, mode, want):
    assert score(answer, refs, mode) == pytest.approx(want)


def test_scorer_refuses_nonsense():
    with pytest.raises(ValueError):
        score("x", [], "all")
    with pytest.raises(ValueError):
        score("x", ["x"], "most")


def _shingles(text: str, k: int = 8) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(w[i:i + k]) for i in range(len(w) - k + 1)}


def test_eval_and_calibration_share_no_text_or_needles(tok, prompts):
    calib_topics = set().union(*map(_shingles, topics.values()))
    corpus = " ".join(u for p in load_corpus().paragraphs for u in p)
    assert not _shingles(corpus) & calib_topics  # the haystacks: no run of 8 words in common
    calib = [tok.decode(p.input_ids) for s in "AB" for p in calibration_prompts(tok, [1024, 2048], s, 2)]
    calib += [tok.decode(passkey_prompt(tok, 1024, s).input_ids) for s in range(4)]
    # refine's held-in prompts, every question they ask
    calib += [tok.decode(calibration_data.make_prompt(tok, 1024, "AB"[s % 2], 1000 + s, question).input_ids)
              for question in QUESTIONS for s in range(2)]
    calib_shingles = set().union(*map(_shingles, calib))
    for p in prompts:
        assert not _shingles(p.context) & calib_shingles, p.name
    for p in (p for p in prompts if p.task in NEEDLE_TASKS):  # cwe's refs are plain English words
        for r in p.refs:  # a needle's value never stands in a calibration prompt
            assert not any(re.search(rf"(?<![0-9A-Za-z]){re.escape(r)}(?![0-9A-Za-z])", c) for c in calib), r
    calib_needles = {m for c in calib for m in re.findall(r"pass key is (\d+)|register (\S+) is", c)}
    eval_text = " ".join(p.context for p in prompts)
    assert calib_needles and not any(v and v in eval_text for pair in calib_needles for v in pair)


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    return synthetic_plan(model_dir(), dense_budget, tmp_path_factory.mktemp("plan")).parent


def test_a_plan_for_another_model_is_refused(plan, tmp_path, capsys):
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((model_dir() / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanModelMismatchError, match="num_layers"):
        run_eval(EvalConfig(plans=[plan], model=other, lengths=[1024], per_task=1, out=tmp_path / "out"))
    assert main(["eval", "--plan", str(plan), "--model", str(other), "--lengths", "1024"]) == 2
    assert "made for another model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any server or file


def test_lengths_past_the_model_limit_are_refused(plan, tmp_path):
    with pytest.raises(ValueError, match="exceed the model's context"):
        run_eval(EvalConfig(plans=[plan], model=model_dir(), lengths=[8192], per_task=1, out=tmp_path))
    assert default_lengths(8192) == [2048, 4096, 8064]
    assert default_lengths(131072)[-2:] == [65536, 130944]


def test_cli_flags():
    a = build_parser().parse_args(["eval", "--plan", "P", "--device", "cuda", "--lengths", "2048", "4096",
                                   "--per-task", "3", "--tasks", "passkey", "vt", "--max-new-tokens", "8"])
    assert (a.cmd, a.plan, a.device, a.lengths, a.per_task, a.tasks, a.max_new_tokens, a.out) == \
        ("eval", ["P"], "cuda", [2048, 4096], 3, ["passkey", "vt"], 8, None)
    a = build_parser().parse_args(["eval", "--plan", "P", "Q", "--concurrency", "16", "--parallel-servers",
                                   "--server-args", "--mem-fraction-static 0.1"])
    assert (a.plan, a.concurrency, a.parallel_servers, a.server_args) == (["P", "Q"], 16, True,
                                                                          "--mem-fraction-static 0.1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--tasks", "niah_single_9"])


def _rows(dense: list[float], sparse: list[float], task="passkey", length=1024) -> list[dict]:
    return [{"task": task, "length": length, "dense": {"score": d, "answer": str(d), "ttft_s": 1.0},
             "sparse": {"score": s, "answer": str(s), "ttft_s": 2.0}} for d, s in zip(dense, sparse)]


def test_paired_difference_and_interval():
    assert paired_interval([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)
    lo, hi = paired_interval([1] * 50, [1] * 40 + [0] * 10)
    assert -0.34 < lo < -0.26 and -0.14 < hi < -0.06  # mean -0.2, n 50: about +- 0.11
    # pairing: sparse misses exactly the prompts dense misses → no difference at all, however noisy the scores
    cells = summarize(_rows([1, 0] * 10, [1, 0] * 10) + _rows([1] * 4, [0.5] * 4, "multivalue", 2048))
    assert [(c.task, c.length, c.n) for c in cells] == [("passkey", 1024, 20), ("multivalue", 2048, 4)]
    assert (cells[0].dense, cells[0].diff, cells[0].ci_low, cells[0].ci_high, cells[0].identical) == (50, 0, 0, 0, 20)
    assert (cells[1].sparse, cells[1].diff, cells[1].identical) == (50, -50, 0)
    assert (cells[1].ttft_dense_s, cells[1].ttft_sparse_s) == (1.0, 2.0)


def test_summary_table_plot_and_json(tmp_path):
    from dataclasses import asdict
    rows = _rows([1, 1, 0], [1, 0, 0]) + _rows([1, 0, 0], [1, 0, 0], "passkey", 2048) + _rows([1], [1], "vt")
    doc = {"date": "2026-12-02", "plan": "P", "model": "/m/SmolLM2", "density": {"1024": 0.8, "2048": 0.7},
           "settings": {"device": "cpu", "dtype": "float32", "dense_backend": "torch_native"},
           "summary": [asdict(c) for c in summarize(rows)]}
    text = "\n".join(summary_lines(doc))
    assert "passkey     1K    3   66.7   33.3  -33.3" in text and "2K 0.700" in text
    plot_accuracy(doc, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 10_000
    assert load_eval(tmp_path) is None
    assert text.startswith("eval (2026-12-02): cpu float32")      # an eval from before the card was recorded
    doc["settings"] = {**doc["settings"], "device": "cuda", "accelerator": "NVIDIA H100 80GB HBM3"}
    assert summary_lines(doc)[0].startswith("eval (2026-12-02): cuda (NVIDIA H100 80GB HBM3) float32")


def test_progress_resumes_what_was_answered(tmp_path):
    key = answer_key(["python", "-m", "sglang_shplb.launch_server"], "plan-sha", [1, 2, 3], 12)
    assert key != answer_key(["python", "-m", "sglang_shplb.launch_server"], "other-plan", [1, 2, 3], 12)
    assert key != answer_key(["python", "-m", "sglang_shplb.launch_server"], "plan-sha", [1, 2, 3], 13)
    assert key != answer_key(["python", "-m", "sglang_shplb.launch_server"], "plan-sha", [1, 2, 3], 12, "sglang 0.5.17")
    p = Progress.open(tmp_path)
    p.add(key, {"answer": " 1234567."})
    with open(p.path, "a") as f:
        f.write('{"key": "cut sho')  # the line a killed run was writing
    again = Progress.open(tmp_path)
    assert again.answers == {key: {"answer": " 1234567."}}
    again.finish()
    assert not p.path.exists() and Progress.open(tmp_path).answers == {}


def test_server_specs_one_dense_and_a_sparse_server_per_plan(tmp_path):
    from sglang_shplb.evaluation.servers import server_specs

    dense, sparse = server_specs(tmp_path, [tmp_path / "a" / "plan.json", tmp_path / "b" / "plan.json"], "cuda",
                                 "bfloat16", 8200, concurrency=16, extra=("--mem-fraction-static", "0.1"))
    assert [s.name for s in sparse] == ["sparse:a", "sparse:b"]
    assert "--attention-backend" in dense.args and "--shplb-plan" not in dense.args
    for s in sparse:  # the same flags but the backend
        assert s.args[:-3] == dense.args[:-2] and s.args[-3] == "--shplb-plan"
        assert s.args[-1] == "--shplb-always-backend"   # a plan stock everywhere is still served through shplb
    assert dense.args[dense.args.index("--max-running-requests") + 1] == "17"   # a slot for the prompt in chunks
    assert dense.args[dense.args.index("--cuda-graph-max-bs") + 1] == "16" and "--disable-prefill-cuda-graph" in dense.args
    assert dense.args[-4:-2] == ("--mem-fraction-static", "0.1")
    _, (one,) = server_specs(tmp_path, [tmp_path / "a" / "plan.json"], "cpu", "float32", 2048)
    assert one.name == "sparse" and one.env["SGLANG_USE_CPU_ENGINE"] == "1" and "--shplb-dense-backend" not in one.args
    dense, (one,) = server_specs(tmp_path, [tmp_path / "a" / "plan.json"], "cuda", "bfloat16", 2048, dense_backend="triton")
    assert dense.args[-2:] == ("--attention-backend", "triton")
    assert one.args[one.args.index("--shplb-dense-backend") + 1] == "triton"


def test_two_plans_in_one_folder_are_refused(plan, tmp_path):
    with pytest.raises(ValueError, match="same plan folder"):
        run_eval(EvalConfig(plans=[plan, plan / "plan.json"], model=model_dir(), lengths=[1024], per_task=1))


def test_answers_of_changed_code_are_not_resumed(tmp_path):
    """A sparse server's answers depend on this package's code, which neither the command line nor the plan shows:
    the key changes with any source or launch-config table under the package, not with caches."""
    pkg = tmp_path / "pkg"
    (pkg / "kernels" / "tuned").mkdir(parents=True)
    (pkg / "patterns.py").write_text("DECODE_MIN_PAGES = 16\n")
    (pkg / "kernels" / "tuned" / "h200.json").write_text("{}")
    before = package_digest(pkg)
    assert package_digest(pkg) == before
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "patterns.cpython-311.pyc").write_bytes(b"\0")
    (pkg / "notes.txt").write_text("not code")
    assert package_digest(pkg) == before
    (pkg / "patterns.py").write_text("DECODE_MIN_PAGES = 32\n")
    assert package_digest(pkg) != before
    (pkg / "patterns.py").write_text("DECODE_MIN_PAGES = 16\n")
    (pkg / "kernels" / "tuned" / "h200.json").write_text('{"k": 1}')
    assert package_digest(pkg) != before
    assert software_id(True).startswith(software_id(False) + ", sglang_shplb ")
    assert package_digest() in software_id(True)
