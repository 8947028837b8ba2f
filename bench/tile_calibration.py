"""The cost-model calibration table with both top-k granularities: a base table's records (from
``bench/prefill_sweep.py``) with its top-k ones replaced by the top-k rows of a ``bench/tiles.py`` run
(64-token blocks on the autotuned 64-row index kernel, ``tile`` 128 on the autotuned 128 x 128 TMA kernel,
both from the same run). No GPU needed. Writes ``calibration_{gpu}_tiles.json`` (the GPU of the tiles run),
which ``python -m sglang_shplb place --calibration`` reads.

    python bench/tile_calibration.py TILES_JSON BASE_CALIBRATION --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sglang_shplb.core.patterns import BLOCK, HeadBudget  # noqa: E402
from sglang_shplb.planning.cost_model import CostModel, calibration_record, write_calibration  # noqa: E402

from timing import device_tag  # noqa: E402  (bench/timing.py)


def tile_records(res: dict) -> list[dict]:
    """Records of the top-k rows of a tiles result; the time is one call for all heads of the layer."""
    sh = res["shape"]
    recs = []
    for row in res["prefill"]:
        n = row["ctx"]
        for c in row["configs"]:
            if not c["name"].startswith("topk"):
                continue
            frac, tile = c["name"][4:].split("/")
            variant = "index64_auto" if int(tile) == BLOCK else "tile_tma_auto"
            if variant in c["variants"]:
                recs.append(calibration_record(HeadBudget.topk(float(frac), 2, tile=int(tile)), n, sh["d"],
                                               sh["hq"] // sh["hkv"], sh["hq"], c["variants"][variant]["ms"],
                                               config=c["name"], index_ms=c["index_ms"]))
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tiles_json", help="tiles_{gpu}.json of bench/tiles.py")
    ap.add_argument("base_calibration", help="calibration table whose non-top-k records are kept")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    with open(a.tiles_json) as f:
        res = json.load(f)
    with open(a.base_calibration) as f:
        base = json.load(f)
    recs = tile_records(res)
    keep = [r for r in base["records"] if r["pattern"] != "topk"]
    kernel = (base["kernel"] + f"; top-k from a bench/tiles.py run ({res['date']}): 64-token blocks on the 64-row "
              "index kernel, tile 128 on tile_prefill (128x128, TMA)")
    os.makedirs(a.out, exist_ok=True)
    path = write_calibration(os.path.join(a.out, f"calibration_{device_tag(res['device'])}_tiles.json"),
                             base["device"], res["date"], kernel, keep + recs)
    cm = CostModel.from_calibration(path)
    b64, b128 = HeadBudget.topk(0.1, 2), HeadBudget.topk(0.1, 2, tile=2 * BLOCK)
    for n in (16384, 65536, 131072):
        t64, t128 = (cm.head_time(b, n, res["shape"]["d"], 4) * 1e3 for b in (b64, b128))
        print(f"{n:>6d}: top-k 0.1 per head {t64:.3f} ms at 64-token blocks, {t128:.3f} ms at 128 ({t64 / t128:.2f}x)")
    print(f"wrote {path}: {len(keep)} records kept + {len(recs)} top-k records")


if __name__ == "__main__":
    main()
