"""What the shplb server refuses before serving, naming the cause: SGLang modes it does not support yet
(parsed by SGLang's own argument handling), and a TP size whose head slicing SGLang would pad."""
from __future__ import annotations

import pytest

import sglang  # noqa: F401  (tests/run.sh installs it)

from serving_helpers import ROOT, model_dir


@pytest.fixture(scope="module")
def server_args_of():
    from sglang.srt.server_args import prepare_server_args

    from sglang_shplb.serving.plugin import register
    register()
    base = ["--model-path", str(model_dir()), "--device", "cpu", "--attention-backend", "shplb"]
    return lambda extra: prepare_server_args(base + extra)


@pytest.mark.parametrize("extra,flag", [
    (["--dcp-size", "2", "--tp", "2"], "--dcp-size"),
    (["--attn-cp-size", "2", "--tp", "2"], "--attn-cp-size"),
    (["--speculative-algorithm", "NGRAM"], "--speculative-algorithm"),
    (["--cuda-graph-backend-prefill", "full"], "--cuda-graph-backend-prefill full"),
])
def test_unsupported_sglang_modes_are_refused_naming_the_flag(server_args_of, extra, flag):
    from sglang_shplb.serving.modes import UnsupportedModeError, check_supported
    with pytest.raises(UnsupportedModeError, match=flag):
        check_supported(server_args_of(extra))


def test_supported_modes_pass(server_args_of):
    from sglang_shplb.serving.modes import check_supported, unsupported_modes
    sa = server_args_of(["--tp", "3", "--cuda-graph-backend-prefill", "breakable"])
    assert unsupported_modes(sa) == []
    check_supported(sa)


def test_launcher_refuses_a_tp_size_sglang_would_pad(capsys):
    from sglang_shplb.serving.launch import EXIT_BAD_PLAN, main
    # the default plan holds TP 2 placements, but 9 query heads do not split over 2 ranks
    rc = main(["--model-path", str(model_dir()), "--shplb-plan", str(ROOT / "bench/results/default_plan"),
               "--tp-size", "2"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_PLAN and "HeadMapError" in err and "9 query heads" in err, err


def test_the_launcher_asks_cuda_for_bucketed_attention_plans_only_without_the_warm_up():
    """``launch_server`` sets torch's cuDNN switch (plans by power-of-two length bucket, slower at steady state) in the
    environment the scheduler processes inherit only with ``--shplb-no-warmup`` (no shapes planned ahead, so any
    new length may plan), and keeps a value the user gave."""
    from sglang_shplb.kernels.dense_pieces import CUDNN_BUCKETED_PLANS_ENV
    from sglang_shplb.serving.launch import bucketed_cudnn_plans
    env: dict[str, str] = {}
    assert bucketed_cudnn_plans(env, warmup=True) is None and CUDNN_BUCKETED_PLANS_ENV not in env
    assert "no warm-up" in bucketed_cudnn_plans(env, warmup=False) and env[CUDNN_BUCKETED_PLANS_ENV] == "1"
    env = {CUDNN_BUCKETED_PLANS_ENV: "0"}
    assert bucketed_cudnn_plans(env, warmup=False) is None and env[CUDNN_BUCKETED_PLANS_ENV] == "0"
