"""What the test files share: the Triton interpreter switch, the device, the tolerances, the batch builders
and the dense-mask reference of one layer. Test files import these names (``from conftest import ...``).

The kernels run under Triton's CPU interpreter unless ``TRITON_INTERPRET=0`` is set (then compiled on the
GPU, as ``bench/serve_gpu.sh tests`` does); the switch is set here, before any test imports Triton.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from sglang_shplb.core.block_masks import build_block_masks  # noqa: E402
from sglang_shplb.core.patterns import BLOCK, HeadBudget  # noqa: E402
from sglang_shplb.kernels.reference import masked_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}   # kernel vs reference, relative error
LAYER_TOL = 1e-5 if DEV == "cpu" else 1e-2                               # a float32 layer vs its reference


def tol(dtype: torch.dtype) -> float:
    """:data:`TOL`; compiled on a GPU, ``tl.dot`` of float32 runs in TF32 (10-bit mantissa): ~1e-3 relative."""
    return 3e-3 if DEV == "cuda" and dtype == torch.float32 else TOL[dtype]


class PagedPool:
    """SGLang's token pool with ``--page-size 64``: 64-slot pages handed out in shuffled order (page 0 reserved
    for padding), position ``p`` of a request at slot ``64 * pages[p // 64] + p % 64``, a ``req_to_token``
    table; ``share`` gives a request another's first pages (a radix-cache prefix hit)."""

    def __init__(self, pool_tokens: int, slots: int, max_ctx: int, hkv: int, d: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.k = torch.zeros(pool_tokens, hkv, d, device=DEV)
        self.v = torch.zeros(pool_tokens, hkv, d, device=DEV)
        self.free = (torch.randperm(pool_tokens // BLOCK - 1, generator=g) + 1).tolist()
        self.pages: dict[int, list[int]] = {}
        self.req_to_token = torch.zeros(slots, max_ctx, dtype=torch.int32, device=DEV)

    def share(self, req, other, npages):
        self.pages[req] = list(self.pages[other][:npages])
        self.req_to_token[req, :npages * BLOCK] = self.req_to_token[other, :npages * BLOCK]

    def put(self, req, start, k, v):
        pages = self.pages.setdefault(req, [])
        slots = []
        for p in range(start, start + k.shape[0]):
            if p // BLOCK == len(pages):
                pages.append(self.free.pop())
            slots.append(pages[p // BLOCK] * BLOCK + p % BLOCK)
        slots = torch.tensor(slots, device=DEV)
        self.k[slots], self.v[slots] = k.to(DEV), v.to(DEV)
        self.req_to_token[req, start:start + k.shape[0]] = slots.int()


def random_pieces(rng, tp: int, heads: int = 32) -> list[list[tuple[float, float, int]]]:
    """Per head 1-3 query-block pieces ``(start, end, rank)`` with random cuts on a 1/1024 grid and ranks:
    placements to price two ways."""
    segs = []
    for _ in range(heads):
        cuts = sorted(set(rng.integers(1, 1024, rng.integers(0, 3)).tolist()))
        bounds = [0.0] + [c / 1024 for c in cuts] + [1.0]
        segs.append([(x, y, int(rng.integers(tp))) for x, y in zip(bounds, bounds[1:])])
    return segs


def make_batch(lens, q_lens, hq, hkv, d, dtype, paged, seed, page=1):
    """Varlen batch on :data:`DEV`: ``q [sum(q_lens), Hq, d]`` (``q_lens[b] <= lens[b]``: chunked prefill when
    smaller), ``k, v`` contiguous (``cu_seqlens_k``) or in a token pool of ``page``-token pages handed out in
    random order (``req_to_token``, ``req_pool_indices``: a 64-token block spans ``64 / page`` scattered
    pages). Returns ``q, k, v, cu_seqlens_q, kv_lens`` and the KV layout keywords."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    kvl = torch.tensor(lens, dtype=torch.int32)
    if paged:
        r, pages = len(lens) + 2, math.ceil((max(lens) + 5) / page)     # request slots, pages per slot
        units = r * pages + 37                                           # pool pages, some never handed out
        k = torch.randn(units * page, hkv, d, generator=g).to(dtype)
        v = torch.randn(units * page, hkv, d, generator=g).to(dtype)
        first = torch.randperm(units, generator=g)[:r * pages].view(r, pages, 1) * page
        kw = dict(req_to_token=(first + torch.arange(page)).view(r, -1).int(),
                  req_pool_indices=torch.randperm(r, generator=g)[:len(lens)].int())
    else:
        k = torch.randn(sum(lens), hkv, d, generator=g).to(dtype)
        v = torch.randn(sum(lens), hkv, d, generator=g).to(dtype)
        kw = dict(cu_seqlens_k=torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32))
    return (q.to(DEV), k.to(DEV), v.to(DEV), cu_q.to(DEV), kvl.to(DEV), {n: t.to(DEV) for n, t in kw.items()})


def seq_kv(k, b, n, kw):
    """The first ``n`` keys (or values) of sequence ``b`` of a :func:`make_batch` layout."""
    if "req_to_token" in kw:
        return k[kw["req_to_token"][int(kw["req_pool_indices"][b]), :n].long()]
    s = int(kw["cu_seqlens_k"][b])
    return k[s:s + n]


# ---------------------------------------------------------------------------------------------------
# one attention layer (the backend's paths, TP ranks)
# ---------------------------------------------------------------------------------------------------
def sequence(n, hq, hkv, d, seed):
    """One sequence's ``q [n, Hq, d]``, ``k [n, Hkv, d]`` (scaled by 2: peakier scores) and ``v``, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hq, d, generator=g), torch.randn(n, hkv, d, generator=g) * 2,
            torch.randn(n, hkv, d, generator=g))


def mask_reference(budgets, q, k, v, scale):
    """The single-device sparse reference of one whole sequence: block masks + masked dense attention."""
    return masked_attention(q, k, v, build_block_masks(budgets, q.transpose(0, 1), k.transpose(0, 1)), scale)


def budgets_mixed():
    """Six heads, two KV groups: every pattern."""
    return [HeadBudget.dense(), HeadBudget.topk(0.3, min_blocks=2), HeadBudget.vslash(0.3, min_blocks=1),
            HeadBudget.streaming(64, 128), HeadBudget.topk(0.5, min_blocks=2), HeadBudget.dense()]


def budgets_positional():
    """Six heads, two KV groups: KV group 0 dense, group 1 streaming (three rules): masks of positions only."""
    return [HeadBudget.dense()] * 3 + [HeadBudget.streaming(64, 128), HeadBudget.streaming(0, 64),
                                       HeadBudget.streaming(128, 64)]


def moving_placements(hq: int, tp: int, group: int = 3) -> dict:
    """One layer's placements of ``hq`` q heads (``group`` per KV head) on ``tp`` ranks, by name: ``home``
    (SGLang's slicing), ``groups`` (every rank computes the next rank's heads), ``split_group`` (rank 0's
    last head on the last rank), ``pieces`` (a head of rank 1 cut over every rank, rank 0's first head in two
    pieces). Each covers every (head, query block) once."""
    from sglang_shplb.core.head_map import rank_heads
    from sglang_shplb.core.placement_types import LayerPlacement, Piece, Placement, check_coverage

    home = [[Piece(h) for h in rank_heads(hq, tp, r)] for r in range(tp)]
    rot = [[Piece(h) for h in rank_heads(hq, tp, (r + 1) % tp)] for r in range(tp)]
    split = [list(x) for x in home]
    split[tp - 1].append(split[0].pop())
    pieces = [list(x) for x in home]
    h = pieces[1].pop(0).head
    cuts = [0.0, 0.3] + [i / tp for i in range(2, tp + 1)]
    for r in range(tp):
        pieces[r].append(Piece(h, cuts[r], cuts[r + 1]))
    h2 = pieces[0].pop(0).head
    pieces[0].append(Piece(h2, 0.0, 0.55))
    pieces[tp - 1].append(Piece(h2, 0.55, 1.0))
    out = {"home": home, "groups": rot, "split_group": split, "pieces": pieces}
    for name, gp in out.items():
        check_coverage(Placement(tp, 0, name, [LayerPlacement(gp)]), hq)
    return {k: LayerPlacement(v) for k, v in out.items()}
