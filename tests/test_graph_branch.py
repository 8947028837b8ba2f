"""Conditional decode branches inside a CUDA graph (``serving/graph_branch.py``): which layers take them, their
flags per bucket, the config switch; on a GPU, a captured graph that runs exactly the flagged branch."""
import pytest
import torch

from sglang_shplb.serving.config import ENV_GRAPH_BRANCHES, ServingConfig
from sglang_shplb.serving.graph_branch import DecodeBranches, branches_supported, captured_if, routed_layers

STOCK_BY_BUCKET = [frozenset({0, 1, 2}), frozenset({0, 1}), frozenset({0})]


def test_routed_layers_are_stock_in_some_buckets_not_all():
    # 0: stock everywhere (captured on the stock backend), 3: sparse everywhere
    assert routed_layers(STOCK_BY_BUCKET, [0, 1, 2, 3]) == {1, 2}
    assert routed_layers([frozenset({1})] * 3, [0, 1]) == frozenset()       # one route per layer: none routed
    assert routed_layers([], [0, 1]) == frozenset()


def test_flags_follow_the_bucket_one_route_per_layer():
    br = DecodeBranches(STOCK_BY_BUCKET, routed_layers(STOCK_BY_BUCKET, range(4)), 4, "cpu")
    assert br.layers == {1, 2}
    for b, stock in enumerate(STOCK_BY_BUCKET):
        br.set_bucket(b)
        for li in range(4):
            assert bool(br.stock(li)) == (li in stock) and bool(br.sparse(li)) == (li not in stock)
    view = br.stock(2)                       # captured graphs hold these views: set_bucket rewrites in place
    br.set_bucket(0)
    assert bool(view) and view.data_ptr() == br.flags[0, 2].data_ptr()


def test_config_switch_travels_by_environment():
    assert ServingConfig.from_env({}).decode_graph_branches is True
    cfg = ServingConfig.from_env({ENV_GRAPH_BRANCHES: "0"})
    assert cfg.decode_graph_branches is False
    assert ServingConfig.from_env(cfg.to_env()).decode_graph_branches is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_branches_run_the_flagged_one():  # pragma: no cover - GPU only
    # the torch SGLang 0.5.17 serves with (2.11) must capture them, or routed layers fall back to the route flag
    assert branches_supported(), f"torch {torch.__version__} captures no conditional CUDA-graph nodes"
    br = DecodeBranches(STOCK_BY_BUCKET, {1}, 3, "cuda")
    x = torch.arange(8.0, device="cuda")
    out = torch.zeros_like(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        with captured_if(br.stock(1)):
            out.copy_(x * 2)
        with captured_if(br.sparse(1)):
            out.copy_(x + 100)
    for b, want in ((0, x * 2), (2, x + 100), (1, x * 2)):
        br.set_bucket(b)
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want), b
