"""How many key chunks a dense piece's prefix should be cut into: ``piece_after_prefix`` (the prefix rectangle
and the causal square, merged) timed at a sweep of split counts around :func:`.dense_pieces.prefix_splits`'
choice, on cuDNN and flash, for the short-piece-after-a-long-prefix shapes moved and split units make, and for
shapes whose grid already fills the GPU (where the choice is 1). Prints each time and its ratio to one call.

  python bench/prefix_splits.py --out $OUT                             # GPU
  TRITON_INTERPRET=1 python bench/prefix_splits.py --cpu-smoke --out /tmp/ps
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

from sglang_shplb.kernels.dense_pieces import KERNEL_Q_TILE, piece_after_prefix, prefix_splits  # noqa: E402

#: (KV groups G, q heads per group S, rows n, prefix p): round 23's slow pieces (1,408 rows after 104K, 1,600 after
#: 49K, 13,056 and 17,408 rows after 104K), a GQA group of 4, pieces that fill the GPU already
GPU_CASES = [(1, 1, 1408, 104448), (1, 4, 1408, 104448), (1, 1, 1600, 49152), (1, 1, 1024, 32768),
             (2, 4, 1024, 32768), (1, 1, 4096, 65536), (1, 1, 13056, 104448), (1, 1, 17408, 104448),
             (1, 4, 8192, 65536), (1, 1, 16384, 65536)]
SMOKE_CASES = [(1, 1, 64, 512), (1, 2, 32, 300)]


def sweep(G: int, S: int, n: int, p: int, programs: int, dev, dt, d: int, smoke: bool, reps: int,
          backends: list[str]) -> dict:
    q = torch.randn(G, S, n, d, device=dev, dtype=dt)
    k, v = (torch.randn(G, p + n, d, device=dev, dtype=dt) for _ in range(2))
    grid = G * -(-S * n // KERNEL_Q_TILE)
    chosen = prefix_splits(S * n, G, p, programs)
    counts = sorted({1, chosen, max(1, chosen // 2), 2 * chosen, 2 * -(-programs // grid)})
    row = {"G": G, "S": S, "n": n, "prefix": p, "grid": grid, "chosen": chosen, "ms": {}, "max_diff": {}}
    for be in backends:
        ref = piece_after_prefix(q, k, v, d ** -0.5, be, 1)
        for c in counts:
            got = piece_after_prefix(q, k, v, d ** -0.5, be, c)
            row["ms"][f"{be} {c}"] = bench(lambda: piece_after_prefix(q, k, v, d ** -0.5, be, c), smoke, reps)
            row["max_diff"][f"{be} {c}"] = float((got - ref).abs().max())
        one = row["ms"][f"{be} 1"]
        log(f"G {G} S {S} rows {n:6d} prefix {p:6d} grid {grid:4d} chosen {chosen:3d} {be:5s}: "
            + ", ".join(f"{c}: {row['ms'][f'{be} {c}']:.3f} ms (x{one / row['ms'][f'{be} {c}']:.2f})" for c in counts))
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
    dump = results_writer(res, str(out / f"prefix_splits_{device_tag(name)}"))
    log(f"dense piece after a prefix by split count, {name}, {programs} SMs")
    for case in SMOKE_CASES if smoke else GPU_CASES:
        res["cases"].append(sweep(*case, programs, dev, dt, d, smoke, a.reps, backends))
        dump()


if __name__ == "__main__":
    main()
