"""Which kernel should run a dense piece's prefix rectangle: ``piece_after_prefix`` (the prefix rectangle and the
causal square, merged) on cuDNN and on flash, both calls on the one kernel, for the short-piece-after-a-long-prefix
shapes moved and split units make and for shapes whose grid fills the GPU; then as the package runs it (the
prefix on :func:`.dense_pieces.prefix_backend`'s choice, the square on cuDNN). Prints the times and ratios.

  python bench/prefix_kernel.py --out $OUT                             # GPU
  python bench/prefix_kernel.py --cpu-smoke --out /tmp/pk              # logic check on the CPU (math vs flash)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from timing import bench, device_name, device_tag, log, results_writer  # noqa: E402

from sglang_shplb.kernels.dense_pieces import (piece_after_prefix, prefix_backend, prefix_grid,  # noqa: E402
                                               unrouted_prefixes)

#: (KV groups G, q heads per group S, rows n, prefix p): round 23's slow pieces (1,408 rows after 104K, 1,600 after
#: 49K, 13,056 and 17,408 rows after 104K), a GQA group of 4, pieces that fill the GPU already
GPU_CASES = [(1, 1, 1408, 104448), (1, 4, 1408, 104448), (1, 1, 1600, 49152), (1, 1, 1024, 32768),
             (2, 4, 1024, 32768), (1, 1, 4096, 65536), (1, 1, 13056, 104448), (1, 1, 17408, 104448),
             (1, 4, 8192, 65536), (1, 1, 16384, 65536)]
SMOKE_CASES = [(1, 1, 64, 512), (1, 2, 32, 300)]


def case(G: int, S: int, n: int, p: int, programs: int, dev, dt, d: int, smoke: bool, reps: int,
         backends: list[str]) -> dict:
    q = torch.randn(G, S, n, d, device=dev, dtype=dt)
    k, v = (torch.randn(G, p + n, d, device=dev, dtype=dt) for _ in range(2))
    grid = prefix_grid(S * n, G)
    row = {"G": G, "S": S, "n": n, "prefix": p, "grid": grid,
           "routed_to": prefix_backend(S * n, G, programs, backends[0]), "ms": {}, "max_diff": {}}

    def call(be: str, routed: bool):
        if routed:
            return piece_after_prefix(q, k, v, d ** -0.5, be)
        with unrouted_prefixes():
            return piece_after_prefix(q, k, v, d ** -0.5, be)

    ref = call(backends[-1], False)
    for name, be, routed in [(be, be, False) for be in backends] + [("package", backends[0], True)]:
        row["ms"][name] = bench(lambda: call(be, routed), smoke, reps)
        row["max_diff"][name] = float((call(be, routed) - ref).abs().max())
    base = row["ms"][backends[0]]
    log(f"G {G} S {S} rows {n:6d} prefix {p:6d} grid {grid:4d} -> {row['routed_to']:5s}: "
        + ", ".join(f"{k} {t:.3f} ms (x{base / t:.2f})" for k, t in row["ms"].items()))
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50, help="milliseconds of repeats per timing")
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    a = ap.parse_args(argv)
    smoke = a.cpu_smoke
    dev, dt, d = ("cpu", torch.float32, 64) if smoke else ("cuda", torch.bfloat16, 128)
    programs = 8 if smoke else torch.cuda.get_device_properties(0).multi_processor_count
    backends = ["math", "flash"] if smoke else ["cudnn", "flash"]
    name = device_name(smoke)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": name, "date": time.strftime("%Y-%m-%d"), "argv": sys.argv[1:], "programs": programs,
           "cases": []}
    dump = results_writer(res, str(out / f"prefix_kernel_{device_tag(name)}"))
    log(f"dense piece after a prefix by kernel, {name}, {programs} SMs; ratios to {backends[0]}")
    for c in SMOKE_CASES if smoke else GPU_CASES:
        res["cases"].append(case(*c, programs, dev, dt, d, smoke, a.reps, backends))
        dump()


if __name__ == "__main__":
    main()
