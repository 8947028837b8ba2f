"""Plugin entry point, version check, support_triton hook, launcher argument handling (no server)."""
import importlib.metadata
import os

import pytest

import sglang  # noqa: F401  (tests/run.sh installs it; a missing SGLang must fail, not skip)
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert any(e.name == "shplb" and e.value == "sglang_shplb.serving.plugin:register" for e in eps)


def test_version_check_names_the_supported_release(monkeypatch):
    from sglang_shplb.serving import version
    monkeypatch.setattr(version, "installed_sglang_version", lambda: "0.5.21")
    with pytest.raises(version.SGLangVersionError, match=r"0\.5\.17.*0\.5\.21"):
        version.check_sglang_version()
    monkeypatch.setattr(version, "installed_sglang_version", lambda: None)
    with pytest.raises(version.SGLangVersionError, match=r"0\.5\.17"):
        version.check_sglang_version()


def test_register_adds_backend_choice_and_cpu_support_triton_hook():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    load_plugins()
    from sglang_shplb.serving.plugin import register
    register()
    assert "shplb" in ATTENTION_BACKENDS and "shplb" in ATTENTION_BACKEND_CHOICES
    from sglang.srt.plugins.hook_registry import HookRegistry
    HookRegistry.apply_hooks()
    import sglang.srt.mem_cache.allocation as alloc
    import sglang.srt.utils.common as common
    # on CPU shplb is treated like its dense delegate torch_native: no Triton cache-index kernels
    assert common.support_triton("shplb") is False
    assert common.support_triton("torch_native") is False
    assert common.support_triton("triton") is True
    assert alloc.support_triton("shplb") is False  # stale `from ... import` bindings patched too


def test_launcher_splits_our_flags():
    from sglang_shplb.serving.launch import split_argv
    ours, rest, args = split_argv(["--model-path", "m", "--shplb-plan", "p", "--shplb-dense-backend=triton",
                                   "--shplb-group-prefill-by-bucket", "--port", "1234"])
    assert ours.shplb_plan == "p" and ours.shplb_dense_backend == "triton" and ours.shplb_group_prefill_by_bucket
    assert rest == ["--model-path", "m", "--port", "1234"]
    assert not ours.shplb_no_warmup and not ours.shplb_always_backend
    # every switch of ours takes no value: the flag after it stays SGLang's (until 2026-12-07 --shplb-no-warmup
    # swallowed it)
    ours, rest, _ = split_argv(["--model-path", "m", "--shplb-no-warmup", "--port", "1234", "--shplb-always-backend",
                                "--shplb-dense-fallback", "--host", "h", "--shplb-group-prefill-by-bucket"])
    assert ours.shplb_no_warmup and ours.shplb_always_backend and ours.shplb_dense_fallback
    assert rest == ["--model-path", "m", "--port", "1234", "--host", "h"]


def test_warmup_switch_reaches_the_scheduler_processes_env():
    from sglang_shplb.serving.config import ENV_WARMUP, ServingConfig
    on = ServingConfig.from_env({})
    assert on.warmup and on.to_env()[ENV_WARMUP] == "1"
    off = ServingConfig.from_env({ENV_WARMUP: "0"})
    assert not off.warmup and ServingConfig.from_env(off.to_env()) == off


def test_launcher_refuses_our_flags_misused():
    from sglang_shplb.serving.launch import split_argv
    with pytest.raises(SystemExit) as e:
        split_argv(["--model-path", "m", "--attention-backend", "triton"])
    assert e.value.code == 2


def test_head_map_is_contiguous_slicing():
    from sglang_shplb.core.head_map import rank_heads
    assert rank_heads(32, 4, 1) == list(range(8, 16))
    with pytest.raises(ValueError):
        rank_heads(9, 2, 0)
