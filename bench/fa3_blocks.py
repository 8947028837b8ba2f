"""Can FlashInfer's Hopper paged prefill (``backend="fa3"``) run our tile-128 top-k prefill faster than our Triton
``tile_prefill``? Each (query head h, 128-row query tile p) becomes a pseudo-sequence whose page table lists the
tile's selected 64-token KV blocks (ascending, the diagonal last); FlashInfer's causal mask is bottom-right
aligned (query i of qlen sees pseudo positions <= kv_len - qlen + i), which is exact here because the tile's
queries are the last tokens of its listed KV. Pages (NHD, page_size 64) are head-major: page ``hk * NBp + b``
holds block b of KV head hk (a per-layer relayout copy, timed apart; so are the plan, host wall time, and the
q / output head-major copies). Against cuDNN SDPA (dense causal), ``tile_prefill`` (also the correctness
reference) and ``backend="fa2"``; budgets: every head ``HeadBudget.topk(f, 2, tile=128)`` per ``--fracs``
(default 0.1: ~10 % of the causal blocks) and all-dense (also one pseudo-sequence per (KV head, tile) with the
g = Hq / Hkv query heads as FlashInfer's heads: the ceiling of FA3 paged on this layout).
Writes ``fa3_blocks_{gpu}.{json,log}``.

    PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site python bench/fa3_blocks.py --out $OUT     # GPU (H100/H200)
    python bench/fa3_blocks.py --cpu-smoke --out /tmp/fa3smoke    # pseudo-sequences vs torch references
"""
from __future__ import annotations

import math
import sys
import time

from prefill_setup import attended_pairs_tokens, one_sequence, parser, start_run, time_sdpa  # noqa: I001

import torch
import torch.nn.functional as F

from sglang_shplb.core.patterns import BLOCK, HeadBudget
from sglang_shplb.kernels import build_block_index
from sglang_shplb.kernels.reference import reference_sparse_prefill, relative_error
from sglang_shplb.kernels.triton_prefill import tile_prefill

from timing import bench, flashinfer_or_none, log

T = 2 * BLOCK          # query rows of one pseudo-sequence


def kv_pages(k: torch.Tensor, nbp: int) -> torch.Tensor:
    """``k [n, Hkv, d]`` → ``[Hkv * nbp, 64, 1, d]``: page ``hk * nbp + b`` = tokens 64b..64b+63 of KV head hk
    (the tail past n zeroed: a masked NaN would still poison p·V)."""
    n, hkv, d = k.shape
    kp = k.new_empty(hkv, nbp * BLOCK, d)
    kp[:, :n].copy_(k.transpose(0, 1))
    kp[:, n:].zero_()
    return kp.view(hkv * nbp, BLOCK, 1, d)


def head_major(x: torch.Tensor, hp: int) -> torch.Tensor:
    """``[n, hp * m, d]`` → ``[hp * n, m, d]``: rows of head-group ``i`` at ``i * n ..``."""
    n, h, d = x.shape
    return x.view(n, hp, h // hp, d).transpose(0, 1).reshape(hp * n, h // hp, d)


def token_major(o: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`head_major`."""
    return o.view(-1, n, o.shape[1], o.shape[2]).transpose(0, 1).reshape(n, -1, o.shape[2])


def tile_lists(bidx, bcnt, dense, n: int):
    """Blocks of every (head, tile p), ascending: ``ent [H, NT, W]`` long, ``cnt [H, NT]``. Listed heads read
    index row r = min(2p + 1, NB - 1) (the pair's superblocks, then the diagonal pair); dense heads 0..r."""
    h, nb, maxk = bidx.shape
    nt = -(-n // T)
    r = (2 * torch.arange(nt, device=bidx.device) + 1).clamp(max=nb - 1)
    w = max(maxk, nb if bool(dense.any()) else 0)
    ent = F.pad(bidx[:, r].long(), (0, w - maxk))
    dn = dense.bool()[:, None]
    ent = torch.where(dn[..., None], torch.arange(w, device=ent.device).expand_as(ent), ent)
    return ent, torch.where(dn, r[None] + 1, bcnt[:, r].long())


def dense_lists(h: int, n: int, dev):
    nb = -(-n // BLOCK)
    z = torch.zeros(h, nb, 1, dtype=torch.int32, device=dev)
    return tile_lists(z, z[..., 0], torch.ones(h, dtype=torch.int32, device=dev), n)


def pseudo_seqs(ent, cnt, n: int, heads_per_kv: int, nbp: int) -> dict:
    """FlashInfer's page table (int32, on ent's device) of the pseudo-sequences (h, p), in that order.
    Tile p = tokens 128p .. e-1, e = min(128p + 128, n); last page = diagonal block D = (e-1) // 64, holding
    e - 64D tokens; kv_len = 64 (cnt - 1) + (e - 64D). Causal is exact iff the last qlen pseudo positions are the
    tile's tokens: entries ascending, the last = D, and the one before = D - 1 where the tile spans two blocks."""
    h, nt, w = ent.shape
    p = torch.arange(nt, device=ent.device)
    end = (T * (p + 1)).clamp(max=n)
    qlen, diag = end - T * p, (end - 1) // BLOCK
    valid = torch.arange(w, device=ent.device) < cnt[..., None]
    last = ent.gather(2, (cnt - 1)[..., None])[..., 0]
    prev = ent.gather(2, (cnt - 2).clamp(min=0)[..., None])[..., 0]
    last_len = end - BLOCK * last
    ok = (((ent[..., 1:] > ent[..., :-1]) | ~valid[..., 1:]).all() & (last == diag).all()
          & ((qlen <= last_len) | ((cnt >= 2) & (prev == diag - 1))).all())
    assert bool(ok), "listed blocks not ascending or not ending at the diagonal: FlashInfer's causal would be wrong"
    base = (torch.arange(h, device=ent.device) // heads_per_kv * nbp)[:, None, None]
    return {"qo_indptr": F.pad(qlen.repeat(h).cumsum(0), (1, 0)).int(),
            "kv_indptr": F.pad(cnt.flatten().cumsum(0), (1, 0)).int(),
            "indices": (ent + base)[valid].int(),          # (h, p, j) order
            "last_page_len": last_len.flatten().int()}


def paged_reference(qh, kp, vp, s: dict) -> torch.Tensor:
    """FlashInfer's paged causal prefill in torch (float32), one pseudo-sequence at a time (smoke only)."""
    qo, kvp, ind, lpl = (s[x].tolist() for x in ("qo_indptr", "kv_indptr", "indices", "last_page_len"))
    out = torch.zeros(qh.shape, dtype=torch.float32)
    for i, lp in enumerate(lpl):
        pg = ind[kvp[i]:kvp[i + 1]]
        kvl = BLOCK * (len(pg) - 1) + lp
        kk, vv = (x[pg].reshape(-1, x.shape[-1])[:kvl].float() for x in (kp, vp))
        qq = qh[qo[i]:qo[i + 1]].float()
        ql = qq.shape[0]
        sc = torch.einsum("qhd,kd->hqk", qq, kk) / math.sqrt(qq.shape[-1])
        allowed = torch.arange(kvl)[None, :] <= (kvl - ql + torch.arange(ql))[:, None]
        pr = torch.softmax(sc.masked_fill(~allowed, float("-inf")), -1)
        out[qo[i]:qo[i + 1]] = torch.einsum("hqk,kd->qhd", pr, vv)
    return out


def fi_runner(wrapper, s: dict, nqo: int, d: int, qh, kp, vp):
    """Plans ``wrapper`` (host wall ms, median of 3 after a first untimed plan) → (plan_ms, run(), out)."""
    kw = dict(num_qo_heads=nqo, num_kv_heads=1, head_dim_qk=d, page_size=BLOCK, causal=True,
              q_data_type=qh.dtype, kv_data_type=kp.dtype)
    args = (s["qo_indptr"], s["kv_indptr"], s["indices"], s["last_page_len"])
    ts = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        wrapper.plan(*args, **kw)
        ts.append((time.perf_counter() - t0) * 1e3)
    oh = torch.empty_like(qh)
    return sorted(ts[1:])[1], lambda: wrapper.run(qh, (kp, vp), out=oh), oh


def warm_backends(fi, backends, dev, d, dtype) -> dict:
    """One wrapper per backend, JIT-compiled on a tiny problem (minutes the first time); failures dropped."""
    wrappers = {}
    for be in backends:
        log(f"JIT/warm-up FlashInfer {be} paged prefill ...")
        t0 = time.time()
        try:
            w = fi.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev),
                                                       "NHD", backend=be)
            q, k, v, _, _ = one_sequence(300, 2, 1, d, dev, dtype)
            s = pseudo_seqs(*dense_lists(2, 300, dev), 300, 2, 5)
            run = fi_runner(w, s, 1, d, head_major(q, 2), kv_pages(k, 5), kv_pages(v, 5))[1]
            run()
            torch.cuda.synchronize()
            wrappers[be] = w
            log(f"  {be} ready in {time.time() - t0:.0f} s")
        except Exception as e:  # noqa: BLE001
            log(f"  {be} failed after {time.time() - t0:.0f} s: {type(e).__name__}: {str(e)[:400]}")
    return wrappers


def time_set(run, wrappers, n, name, budgets, inp, sdpa, rel_ms, tol) -> dict:
    """One budget set at context n: ours, then each FlashInfer backend on each pseudo-sequence layout
    (``rel_ms``: the relayout copies a layer would add to FlashInfer's run)."""
    q, k, v, cu, kvl, kp, vp, nbp = inp
    hq, hkv, d, smoke = run.hq, run.hkv, run.d, run.smoke
    idx = build_block_index(budgets, q, k, cu, kvl, n, cu_seqlens_k=cu)
    causal = n * (n + 1) // 2
    dens = sum(attended_pairs_tokens(idx, n)) / (causal * hq) if name != "dense" else 1.0
    o_ours = torch.empty_like(q)
    heads = torch.arange(hq, dtype=torch.int32, device=q.device)
    f_ours = lambda: tile_prefill(q, k, v, idx.block_idx, idx.block_cnt, idx.head_dense, heads, cu, kvl, n,  # noqa: E731
                                  cu_seqlens_k=cu, out=o_ours)
    f_ours()
    t_ours = bench(f_ours, smoke)
    ent = {"name": name, "density": dens, "ours_ms": t_ours, "ours_eff": dens * sdpa / t_ours, "variants": {}}
    log(f"{name}: density {dens:.3f}; tile_prefill {t_ours:.3f} ms eff {ent['ours_eff']:.3f}")
    if smoke:   # the references themselves: our kernel vs the masked torch reference
        ref = reference_sparse_prefill(q, k, v, [idx.masks(0, -(-n // BLOCK))], cu, kvl, cu_seqlens_k=cu)
        ent["ours_vs_masked_ref"] = relative_error(o_ours, ref)
        ent["failed"] = ent["ours_vs_masked_ref"] > tol
    lays = [("q", tile_lists(idx.block_idx[0], idx.block_cnt[0], idx.head_dense, n), hq)]
    if name == "dense":
        lays.append(("gqa", dense_lists(hkv, n, q.device), hkv))
    for lay, (bl, cnt), hp in lays:
        t0 = time.perf_counter()
        s = pseudo_seqs(bl, cnt, n, hq // hkv if lay == "q" else 1, nbp)
        build_ms = (time.perf_counter() - t0) * 1e3
        qh = head_major(q, hp)
        for be in (wrappers if not smoke else ["torch"]):
            vn = f"{be}_{lay}"
            log(f"  {vn}: {len(s['last_page_len'])} pseudo-sequences, {len(s['indices'])} pages, planning ...")
            try:
                if smoke:   # the torch model of FlashInfer's paged causal prefill stands in for it
                    plan_ms, f = 0.0, (lambda: paged_reference(qh, kp, vp, s))
                    oh = f()
                else:
                    plan_ms, f, oh = fi_runner(wrappers[be], s, hq // hp, d, qh, kp, vp)
                    f()
                t = bench(f, smoke)
                o = token_major(oh, n)
                err, mx = relative_error(o, o_ours), float((o.float() - o_ours.float()).abs().max())
                ve = {"ms": t, "eff": dens * sdpa / t, "ours_over_fi": t_ours / t, "ms_plus_relayout": t + rel_ms,
                      "ours_over_fi_plus_relayout": t_ours / (t + rel_ms), "plan_ms": plan_ms,
                      "seq_build_ms": build_ms, "rel_err_vs_ours": err, "max_abs_err_vs_ours": mx,
                      "failed": err > tol}
                if smoke:
                    ve["rel_err_vs_masked_ref"] = relative_error(o, ref)
                    ve["failed"] |= ve["rel_err_vs_masked_ref"] > tol
            except Exception as e:  # noqa: BLE001
                log(f"  {vn}: failed: {type(e).__name__}: {str(e)[:400]}")
                ent["variants"][vn] = {"failed": True, "error": f"{type(e).__name__}: {str(e)[:400]}"}
                continue
            ent["variants"][vn] = ve
            log(f"  {vn:9s} {t:9.3f} ms eff {ve['eff']:.3f} ours/fi {ve['ours_over_fi']:.2f}  plan {plan_ms:.1f} ms "
                f"seqs {build_ms:.1f} ms  err vs ours rel {err:.1e} max {mx:.1e}"
                + (f" vs masked ref {ve['rel_err_vs_masked_ref']:.1e}" if smoke else "")
                + ("  FAILED" if ve["failed"] else ""))
    return ent


def time_context(run, wrappers, n: int, fracs, tol) -> dict:
    q, k, v, cu, kvl = one_sequence(n, run.hq, run.hkv, run.d, run.dev, run.dtype)
    t_sdpa = time_sdpa(q, k, v, run.smoke) or {"none": 1.0}
    sdpa = t_sdpa.get("cudnn", min(t_sdpa.values()))
    nbp = -(-n // BLOCK)
    kp, vp = kv_pages(k, nbp), kv_pages(v, nbp)
    oh = head_major(torch.empty_like(q), run.hq)
    relayout = {"kv_pages": bench(lambda: (kv_pages(k, nbp), kv_pages(v, nbp)), run.smoke),
                "q_head_major": bench(lambda: head_major(q, run.hq), run.smoke),
                "out_token_major": bench(lambda: token_major(oh, n), run.smoke)}
    log(f"\n## ctx {n}: SDPA {', '.join(f'{a} {b:.3f} ms' for a, b in t_sdpa.items())}; relayout ms "
        + ", ".join(f"{a} {b:.3f}" for a, b in relayout.items()))
    row = {"ctx": n, "sdpa_ms": t_sdpa, "sdpa_ref_ms": sdpa, "relayout_ms": relayout, "sets": []}
    sets = [(f"topk{f:g}/128", [HeadBudget.topk(f, 2, tile=T)] * run.hq) for f in fracs]
    if run.smoke:   # also a mix of listed and dense heads (tile_lists' two cases in one layer)
        sets.append(("mix", [HeadBudget.topk(0.1, 2, tile=T), HeadBudget.dense()] * (run.hq // 2)))
    for name, budgets in sets + [("dense", [HeadBudget.dense()] * run.hq)]:
        row["sets"].append(time_set(run, wrappers, n, name, budgets, (q, k, v, cu, kvl, kp, vp, nbp), sdpa,
                                    sum(relayout.values()), tol))
        run.dump()
    return row


def main():
    ap = parser(__doc__, "16384,32768,65536")
    ap.add_argument("--fracs", default="0.1", help="top-k fractions of the tile-128 sets (default 0.1)")
    ap.add_argument("--backends", default="fa3,fa2", help="FlashInfer backends (default fa3,fa2)")
    args = ap.parse_args()
    run = start_run(args, "fa3_blocks.py", "fa3_blocks", [300, 1000])
    run.res["budgets"] = {"topk": "HeadBudget.topk(f, 2, tile=128) on every head", "fracs": args.fracs,
                          "density": "attended token pairs / causal pairs (prefill_setup.attended_pairs_tokens)",
                          "eff": "density * t_sdpa(cuDNN) / t", "plan_ms": "host wall, median of 3",
                          "seq_build_ms": "one call, wall, incl. the check's host sync"}
    if run.smoke:   # GQA with 2 KV heads (page offsets hk * NBp); d = 64, the smallest our kernels take
        run.hkv = 2
        run.res["shape"]["hkv"] = 2
    tol = 1e-4 if run.smoke else 2e-2
    fi = flashinfer_or_none(run.smoke)
    wrappers = warm_backends(fi, args.backends.split(","), run.dev, run.d, run.dtype) if fi is not None else {}
    run.res["backends_ok"] = list(wrappers)
    for n in run.ctxs:
        if run.elapsed() > args.budget_s:
            log(f"time budget reached: skipping ctx {n}")
            continue
        run.res["prefill"].append(time_context(run, wrappers, n, [float(x) for x in args.fracs.split(",")], tol))
        run.dump()
    log("\n# summary: ms (per-head efficiency vs cuDNN SDPA); ours/fi > 1: FlashInfer faster")
    bad = 0
    for row in run.res["prefill"]:
        for e in row["sets"]:
            vs = "  ".join(f"{a} {b['ms']:.3f} ({b['eff']:.2f}) x{b['ours_over_fi']:.2f}" if "ms" in b else f"{a} -"
                           for a, b in e["variants"].items())
            log(f"{row['ctx']:6d} {e['name']:12s} ours {e['ours_ms']:.3f} ({e['ours_eff']:.2f})  {vs}")
            bad += e.get("failed", False) + sum(b["failed"] for b in e["variants"].values())
    log(f"{bad} failed rows")
    run.res["wall_s"] = run.elapsed()
    run.dump()
    if run.smoke and bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
