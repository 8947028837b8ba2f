"""The decode kernels and the vertical-slash index builder compile for Hopper (sm_90) on this CPU machine: Triton's interpreter, which the other kernel
tests run under, accepts code its compiler rejects (a name missing from a jit function's globals, a variable
re-bound with another shape inside an ``if``), which then fails only on the GPU. This compiles the launches the
decode path makes (AST -> TTIR -> PTX -> cubin with the ptxas Triton ships), no GPU needed, in a fresh process:
Triton fixes interpreted or compiled kernels at import."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile(fn, ptrs: dict, consts: dict) -> bool:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: ("constexpr" if n in consts else ptrs.get(n, "i32")) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    return "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm


def compile_decode_kernels() -> None:
    from sglang_shplb.kernels import triton_decode, triton_select
    i32 = "*i32"
    sel = dict(Q="*bf16", K="*bf16", KMIN="*bf16", KMAX="*bf16", R2T=i32, RPI=i32, SEQ="*i64", SEL=i32, CNT=i32,
               SCR="*fp32", DONE=i32, PIDX=i32, PCNT=i32, MODE=i32, SINK=i32, WIN=i32, GMODE=i32, ULIST=i32,
               UBITS=i32, UCNT=i32, KBITS=i32, KSTAMP=i32, ROUTE=i32)
    for keep, route, p2 in ((False, False, 16), (False, False, 1024), (True, False, 16), (True, True, 256),
                            (True, True, 1024)):
        assert _compile(triton_select._kernels(), sel, dict(GROUP=4, GP2=4, PAGE=64, D=128, TP=32, P2=p2,
                                                            P2A=triton_select._narrower(p2, 4),
                                                            P2B=triton_select._narrower(p2, 2), UNION=True, KEEP=keep,
                                                            BW=min(32, p2), HAS_ROUTE=route))
    union, grp = triton_decode._kernels()
    assert _compile(grp, dict(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", MidO="*fp32", MidL="*fp32", DONE=i32,
                              req_to_token=i32, req_pool_idx=i32, seq_lens="*i64", gmode=i32, gsink=i32,
                              gwindow=i32, ULIST=i32, UBITS=i32, UCNT=i32, qk_scale="fp32", ROUTE=i32),
                    dict(GROUP=4, GP=16, NSPLIT=32, PAGE=64, D=128, CONTIG=True, DOT_F32=False, PB=2, HAS_ROUTE=True,
                         MINSP=triton_decode.SPLIT_MIN_PAGES))
    assert _compile(union, dict(PIDX=i32, PCNT=i32, seq_lens="*i64", mode=i32, sink=i32, window=i32, gmode=i32,
                                MAP="*i8", ULIST=i32, UBITS=i32, UCNT=i32), dict(GROUP=4, M2=64, TP=1024, PAGE=64))
    print("compiled for sm_90")


def compile_vslash_kernels() -> None:
    from sglang_shplb.kernels import triton_vslash
    i32, f32 = "*i32", "*fp32"
    mass, pick, rows = triton_vslash._kernels()
    kv = dict(Q="*bf16", K="*bf16", heads=i32, M=f32, L=f32, MASS=f32, cu_q=i32, kv_lens=i32, cu_k=i32,
              req_to_token=i32, req_pool_idx=i32, qk_scale="fp32")
    for paged in (False, True):
        for stats in (True, False):
            assert _compile(mass, kv, dict(GROUP=4, D=128, CB=triton_vslash.CB, NCHP=128, PAGED=paged, F32=False,
                                           STATS=stats))
    assert _compile(pick, dict(MASS=f32, ntab=i32, VERT="*i8", SLASH="*i8", kv_lens=i32), dict(NBP=2048))
    assert _compile(rows, dict(VERT="*i8", SLASH="*i8", heads=i32, idx=i32, cnt=i32, cu_q=i32, kv_lens=i32),
                    dict(BM=triton_vslash.BM, NBP=2048, QUERY_ROWS=True))
    print("compiled for sm_90")


@pytest.mark.parametrize("which", ["decode", "vslash"])
def test_kernels_compile_for_sm90(tmp_path, which):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),   # a real compile, no cache hit
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), which], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "compiled for sm_90" in r.stdout, r.stderr[-3000:]


if __name__ == "__main__":
    {"decode": compile_decode_kernels, "vslash": compile_vslash_kernels}[sys.argv[1]]()
