"""Shipped launch configs of the prefill kernels (kernels/tuned.py): the table round trip from Triton's
autotuner caches, its refusals, the CPU path never reading it, and every shipped config being one the
autotuner could have chosen."""
import json

import pytest
import torch
import triton

from sglang_shplb.kernels import tuned
from sglang_shplb.kernels.triton_prefill import INDEX_CONFIGS, RULE_CONFIGS, TILE_CONFIGS


class _Tuner:   # what table_from_autotuners reads of triton.autotune's object: its cache
    def __init__(self, cache):
        self.cache = cache


def _table(gpu="NVIDIA H200"):
    bf = "torch.bfloat16"
    return tuned.table_from_autotuners({
        "index": _Tuner({(128, True, 64, bf, "torch.int32"): triton.Config({}, num_warps=4, num_stages=3)}),
        "rule": _Tuner({(64, 3, False, bf): triton.Config({}, num_warps=8, num_stages=4)}),
        "tile": _Tuner({(128, 4, True, False, 16, bf): triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3)}),
    }, gpu, {"triton": triton.__version__})


def test_table_round_trip_keys_by_values_and_q_dtype(tmp_path):
    (tmp_path / "nvidia_h200.json").write_text(json.dumps(_table()))
    t = tuned.load_table("NVIDIA H200", tmp_path)
    assert t["index"] == {"128,1,64,bfloat16": tuned.LaunchConfig(4, 3)}
    assert t["rule"]["64,3,0,bfloat16"].launch_kwargs() == {"num_warps": 8, "num_stages": 4}
    assert t["tile"]["128,4,1,0,16,bfloat16"].launch_kwargs() == {"num_warps": 8, "num_stages": 3, "BLOCK_N": 64}
    assert tuned.key_string((128, True, 64), torch.float16) == "128,1,64,float16"
    assert tuned.load_table("NVIDIA H100 80GB HBM3", tmp_path) == {}   # no table for that GPU


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.update(version=99), "version"),
    (lambda t: t.update(gpu="NVIDIA H100"), "is for 'NVIDIA H100', not the GPU its file name says"),
    (lambda t: t["kernels"]["tile"].update(key=["D", "GROUP"]), "keyed by"),
])
def test_a_wrong_table_is_refused(tmp_path, edit, match):
    t = _table()
    edit(t)
    (tmp_path / "nvidia_h200.json").write_text(json.dumps(t))
    tuned.load_table.cache_clear()
    with pytest.raises(ValueError, match=match):
        tuned.load_table("NVIDIA H200", tmp_path)


def test_cpu_tensors_never_read_a_table():
    assert tuned.tuned_config("tile", (64, 3, 0, 0, 1), torch.zeros(1)) is None


def test_shipped_tables_hold_only_configs_the_autotuner_tries():
    tables = sorted(tuned.TUNED_DIR.glob("*.json"))
    assert tables, "no tuned table ships with the package"
    allowed = {"index": {(w, s, None) for w, s in INDEX_CONFIGS}, "rule": {(w, s, None) for w, s in RULE_CONFIGS},
               "tile": {(w, s, n) for n, w, s in TILE_CONFIGS}}
    for path in tables:
        gpu = json.loads(path.read_text())["gpu"]
        assert tuned.gpu_slug(gpu) == path.stem
        table = tuned.load_table(gpu)
        assert set(table) == set(tuned.KERNEL_KEYS)
        for kernel, configs in table.items():
            assert configs, f"{path.name}: no configs for {kernel}"
            for key, cfg in configs.items():
                assert len(key.split(",")) == len(tuned.KERNEL_KEYS[kernel]) + 1
                assert (cfg.num_warps, cfg.num_stages, cfg.block_n) in allowed[kernel], (path.name, kernel, key)


def test_a_gpu_without_a_table_takes_one_of_its_compute_capability(tmp_path):
    """An H100 (no table of its own) reads the H200's table when both are sm 9.0, and nothing for another
    capability or a table that names none; its own table, once there, wins; the note the server logs says
    which table and why."""
    h200 = _table()
    h200["capability"] = "9.0"
    (tmp_path / "nvidia_h200.json").write_text(json.dumps(h200))
    (tmp_path / "nvidia_a100_sxm4_80gb.json").write_text(json.dumps(_table("NVIDIA A100-SXM4-80GB")))  # no capability
    tuned.load_table.cache_clear()
    h100 = "NVIDIA H100 80GB HBM3"
    assert tuned.table_path(h100, "9.0", tmp_path).name == "nvidia_h200.json"
    assert tuned.load_table(h100, tmp_path, "9.0") == tuned.load_table("NVIDIA H200", tmp_path)
    assert tuned.load_table(h100, tmp_path, "8.0") == {}          # the A100 table names no capability
    assert tuned.load_table(h100, tmp_path) == {}                 # no capability known: no borrowing
    own = _table(h100)
    own["kernels"]["rule"]["configs"] = {"64,3,0,bfloat16": {"num_warps": 4, "num_stages": 2}}
    (tmp_path / "nvidia_h100_80gb_hbm3.json").write_text(json.dumps(own))
    tuned.load_table.cache_clear()
    assert tuned.load_table(h100, tmp_path, "9.0")["rule"]["64,3,0,bfloat16"] == tuned.LaunchConfig(4, 2)


def test_table_note_names_the_table_and_why(monkeypatch):
    h200 = tuned.table_note("NVIDIA H200", "9.0")
    assert h200 == "launch configs from nvidia_h200.json"
    assert tuned.table_note("NVIDIA H100 80GB HBM3", "9.0") == "launch configs from nvidia_h100_80gb_hbm3.json"
    # a Hopper without its own table borrows the first of its capability, by file name, and says so
    assert "nvidia_h100_80gb_hbm3.json" in tuned.table_note("NVIDIA H800", "9.0")
    assert "same compute capability 9.0" in tuned.table_note("NVIDIA H800", "9.0")
    assert "autotuned on first use" in tuned.table_note("NVIDIA A100-SXM4-80GB", "8.0")
    monkeypatch.setenv("SHPLB_TUNED_CONFIGS", "0")
    assert "off" in tuned.table_note("NVIDIA H200", "9.0")


def test_tables_record_their_capability():
    assert _table().get("capability") is None
    assert tuned.table_from_autotuners({}, "NVIDIA H200", {}, capability="9.0")["capability"] == "9.0"
    for path in sorted(tuned.TUNED_DIR.glob("*.json")):   # every shipped table can serve its GPU's siblings
        assert json.loads(path.read_text()).get("capability"), path.name
