#!/usr/bin/env bash
# GPU end-to-end on the lent GPU, after the bundle calls of ../shared/gpu/README.md (SGLang 0.5.17 in /tmp/site,
# SmolLM2 in /tmp/smollm2). Installs this package offline into /tmp/site, then runs bench/serve_gpu.py.
#   bash bench/serve_gpu.sh MODE[,MODE...]   (llama8b, smollm2, serve = both, decode, tests, routed; all = serve,decode,tests,routed)
# serve: the Llama-3-8B shape then SmolLM2, each against stock FlashInfer (bench/serve_gpu.py's grid).
#   LLAMA_SERVERS (default shplb,flashinfer), LLAMA_FLAGS (more bench/serve_gpu.py flags, e.g. "--lengths 2048,4096
#   --context-length 131200 --repeats 3"), SMOL_SERVERS (default flashinfer,shplb,flashinfer#2: the stock server
#   again after ours, whose ratios to the first are the noise floor): which servers, in order; SMOL_FLAGS (more
#   bench/serve_gpu.py flags, e.g. "--interleave": every server up at once, passes taking turns).
# decode: bench/decode.py sized for a 131,200-token server (as serve's) against sized for each request.
# tests: the kernel-path and kernel tests compiled on the GPU (the machine's own pytest).
# PYTHONPATH_EXTRA: more import paths after /tmp/site (e.g. cutlass-dsl's dsl_packages, which a pip install
#   reaches by a .pth file that PYTHONPATH entries do not read).
# ablate: bench/decode_ablation.py on the GPU in bf16 (ABLATE_TASK, default multivalue, at 2K).
# cold: bench/cold_start.py on SmolLM2's all-sparse plan (after smollm2, which writes it; or COLD_PLAN): what our kernels add to a
#   fresh server's start and first requests, with and without the shipped launch configs.
# onebatch: bench/one_batch.py, SmolLM2's model runner alone (SGLang's one_batch), FlashInfer against shplb on the default
#   plan, rounds alternating (ONEBATCH_FLAGS: more of its flags, e.g. "--rounds 2 --batches 1 -- --profile").
# routed: the Llama-3-8B shape with a plan whose decode route follows the bucket (the CUDA-graph branches) against
#   stock FlashInfer, last because it is the one most likely to fail (a failed server is recorded, not fatal).
set -uo pipefail
export PYTHONPATH=/tmp/site${PYTHONPATH_EXTRA:+:$PYTHONPATH_EXTRA} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site --upgrade . >/dev/null 2>&1 \
  || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site --upgrade .
python3 -c "import importlib.metadata as m; print([e.value for e in m.entry_points(group='sglang.srt.plugins')])"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# modes, comma-separated, run in the order given: serve = llama8b,smollm2; all = serve,decode,tests,routed
what=${1:-serve}; what=${what//all/serve,decode,tests,routed}; what=${what//serve/llama8b,smollm2}
for w in ${what//,/ }; do
  case "$w" in
    llama8b) python3 bench/serve_gpu.py llama8b --out "$OUT/llama8b" --servers "${LLAMA_SERVERS:-shplb,flashinfer}" \
               ${LLAMA_FLAGS:-} ;;
    smollm2) python3 bench/serve_gpu.py smollm2 --out "$OUT/smollm2" --servers "${SMOL_SERVERS:-flashinfer,shplb,flashinfer#2}" \
               ${SMOL_FLAGS:-} ;;
    decode)
      python3 bench/decode.py --ctx 32768,65536 --batch 1,4 --server-ctx 131200 --budget-s 90 --out "$OUT/decode_server_ctx"
      python3 bench/decode.py --ctx 32768,65536 --batch 1,4 --budget-s 90 --out "$OUT/decode_request_ctx" ;;
    tests)
      TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_paged_layer.py tests/test_triton_index.py \
        tests/test_triton_select.py tests/test_decode_fused.py tests/test_kernels.py 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -40 ;;
    routed) python3 bench/serve_gpu.py llama8b --out "$OUT/llama8b_routed" --servers "${ROUTED_SERVERS:-shplb_routed,flashinfer}" ;;
    onebatch) python3 bench/one_batch.py --model /tmp/smollm2 --out "$OUT/one_batch" ${ONEBATCH_FLAGS:-} ;;
    ablate)   # which heads' sparse decode loses the multi-value needle in bf16 (in-process, the round-5 plan at 0.30)
      python3 bench/decode_ablation.py --device cuda --model /tmp/smollm2 \
        --plan bench/results/eval_h200_round5/plans/refined5_d30 --task "${ABLATE_TASK:-multivalue}" --length 2048 \
        --per-task 34 \
        --variants stock,sparse,stream_dense,sel_dense,stream_short_dense,stream_long_dense,stream_dense@0-14,stream_dense@15-29,stream_dense@22-29 \
        --out "$OUT/decode_ablation" ;;
    cold)   # after smollm2 (its plans): stock vs shplb with every sparse layer on our kernels, empty Triton caches
      python3 bench/cold_start.py --model /tmp/smollm2 --plan "${COLD_PLAN:-$OUT/smollm2/plan_shplb_sparse}" \
        --out "$OUT/cold_start" ;;
    *) echo "serve_gpu.sh: unknown mode $w (llama8b, smollm2, serve, decode, tests, routed, ablate, cold, all)" >&2; exit 2 ;;
  esac
done
exit 0
