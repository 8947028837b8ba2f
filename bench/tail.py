"""The dense tail of one layer (every request's last 64 query rows, the sparse heads, dense over all keys): the
Triton route the server takes on CUDA (:func:`sglang_shplb.kernels.triton_tail.tail_attention`: keys read in
place, split over the keys) against the torch route it replaced (:func:`sglang_shplb.kernels.dense_tail.
gathered_tail`: the KV groups' keys gathered from the pool, cuDNN pieces), side by side, same inputs; and, for
scale, one dense head's whole causal prefill over the same ``n`` keys (SDPA).

    python bench/tail.py --out DIR            # GPU: writes DIR/tail_<gpu>.{json,log}
    python bench/tail.py --cpu-smoke          # the logic on a small shape under the Triton interpreter
    python bench/tail.py --shapes llama8b_tp1 --batches 1 --lengths 8192,16384,...,131072 --out DIR
                                              # + what a chunked prefill's tails cost: every chunk, or the last only

Shapes are the per-rank head layouts of ``bench/head_parallel.py`` (Llama-3-8B at TP 1 / 4 / 8 with one dense KV
group per layer at TP 1, a 70B rank at TP 8), bf16, a scattered pool, one request whose last 8192-token chunk
ends at ``n`` keys (``--chunk``), or 4 requests."""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import bench, device_name, device_tag, log, results_writer  # noqa: E402

# name: (q heads of the rank, KV heads of the rank, head dim, tail heads)
SHAPES = {
    "llama8b_tp1": (32, 8, 128, tuple(range(4, 32))),    # the mixed plan: KV group 0 dense, 28 sparse heads
    "llama8b_tp4": (8, 2, 128, tuple(range(8))),
    "llama8b_tp8": (4, 1, 128, tuple(range(4))),
    "llama70b_tp8": (8, 1, 128, tuple(range(8))),
}


def _inputs(hq: int, hkv: int, d: int, kv_lens: list[int], q_lens: list[int], device: str, dtype):
    import torch
    g = torch.Generator(device="cpu").manual_seed(0)
    pool = sum(kv_lens) + 64
    kb = torch.randn(pool, hkv, d, generator=g).to(device, dtype)
    vb = torch.randn(pool, hkv, d, generator=g).to(device, dtype)
    perm = torch.randperm(pool, generator=g)
    r2t = torch.zeros(len(kv_lens), max(kv_lens), dtype=torch.int32)
    c = 0
    for i, L in enumerate(kv_lens):
        r2t[i, :L] = perm[c:c + L].int()
        c += L
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(device, dtype)
    return q, kb, vb, r2t.to(device), torch.arange(len(kv_lens), dtype=torch.int32, device=device)


def run_cell(shape: str, n: int, batch: int, chunk: int, smoke: bool) -> dict:
    import torch
    from sglang_shplb.kernels.dense_tail import gathered_tail
    from sglang_shplb.kernels.head_parallel import KVRows
    from sglang_shplb.kernels.triton_tail import tail_attention

    hq, hkv, d, heads = SHAPES[shape]
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    kv_lens, q_lens = [n] * batch, [min(chunk, n)] * batch
    q, kb, vb, r2t, rpi = _inputs(hq, hkv, d, kv_lens, q_lens, device, dtype)
    scale = d ** -0.5
    o_triton = torch.zeros(q.shape, dtype=dtype, device=device)
    o_torch = torch.zeros(q.shape, dtype=dtype, device=device)

    def triton_route():
        tail_attention(q, kb, vb, r2t, rpi, q_lens, kv_lens, heads, scale, o_triton)

    def torch_route():
        gathered_tail(q, kb, vb, KVRows(r2t, rpi), q_lens, kv_lens, heads, scale, o_torch)

    triton_route()
    torch_route()
    diff = (o_triton.float() - o_torch.float()).abs().max().item()
    t_triton = bench(triton_route, smoke)
    t_torch = bench(torch_route, smoke)
    # one dense head, every row (the sparse head's full price at this length, for scale)
    qh, kh, vh = (x[:n, :1].transpose(0, 1)[None] for x in (torch.randn(n, 1, d, device=device, dtype=dtype),
                                                             kb[:n, :1], vb[:n, :1]))     # [1, 1, n, d]: flash
    t_head = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True), smoke)
    cell = dict(shape=shape, n=n, batch=batch, chunk=chunk, tail_heads=len(heads), triton_ms=t_triton,
                torch_ms=t_torch, speedup=t_torch / t_triton, dense_head_ms=t_head, max_abs_diff=diff)
    log(f"{shape:13s} n={n:6d} b={batch} tail heads {len(heads):2d}: torch (gathered, cuDNN) {t_torch:7.3f} ms  "
        f"triton (in place, split) {t_triton:7.3f} ms  x{t_torch / t_triton:5.2f}; one dense head {t_head:7.3f} ms; "
        f"max|diff| {diff:.3g}")
    return cell


def prompt_sums(cells: list[dict], chunk: int) -> list[dict]:
    """Per shape and batch, for every prompt length ``n`` whose chunk ends (``chunk``, ``2 chunk``, ... ``n``) were
    all measured: the Triton tail summed over the chunks of a chunked prefill of ``n`` tokens, as served until
    2026-12-07 (a tail in every chunk) and now (in the chunk that ends the prompt only)."""
    by = {(c["shape"], c["batch"], c["n"]): c["triton_ms"] for c in cells}
    out = []
    for (shape, batch, n), last in sorted(by.items()):
        ends = range(chunk, n + 1, chunk)
        if n % chunk or any((shape, batch, e) not in by for e in ends):
            continue
        every = sum(by[(shape, batch, e)] for e in ends)
        out.append(dict(shape=shape, batch=batch, n=n, chunks=len(ends), every_chunk_ms=every, last_chunk_ms=last,
                        saved_ms=every - last))
        log(f"{shape:13s} b={batch} prompt {n:6d} in {len(ends):2d} chunks: tails {every:7.3f} ms a layer in every "
            f"chunk, {last:6.3f} ms in the last only (saves {every - last:7.3f} ms a layer)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--cpu-smoke", action="store_true")
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--chunk", type=int, default=8192, help="new tokens of each request (the extend)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    a = ap.parse_args()
    smoke = a.cpu_smoke
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    lengths = [300] if smoke else [int(x) for x in a.lengths.split(",")]
    batches = [1] if smoke else [int(x) for x in a.batches.split(",")]
    name = device_name(smoke)
    res = dict(device=name, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv[1:], cells=[])
    os.makedirs(a.out, exist_ok=True)
    dump = results_writer(res, os.path.join(a.out, f"tail_{device_tag(name)}"))
    log(f"dense tail, one layer, on {name}")
    chunk = 64 if smoke else a.chunk
    for shape in (["llama8b_tp8"] if smoke else a.shapes.split(",")):
        for n in lengths:
            for batch in batches:
                if batch * n > 262144:
                    continue
                res["cells"].append(run_cell(shape, n, batch, chunk, smoke))
                dump()
    res["prompt_sums"] = prompt_sums(res["cells"], chunk)
    dump()


if __name__ == "__main__":
    main()
