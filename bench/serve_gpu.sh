#!/usr/bin/env bash
# GPU end-to-end on the lent H100, after the 4 bundle calls of ../shared/gpu/README.md (SGLang 0.5.17 in /tmp/site,
# SmolLM2 in /tmp/smollm2). Installs this package offline into /tmp/site, then runs bench/serve_gpu.py.
#   bash bench/serve_gpu.sh smollm2|llama8b|all|tests [serve_gpu.py flags, e.g. --backends shplb_full]
# tests: the kernel-path and kernel tests compiled on the GPU (the machine's own pytest).
set -uo pipefail
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/dev/null 2>&1 \
  || python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . 
python3 -c "import importlib.metadata as m; print([e.value for e in m.entry_points(group='sglang.srt.plugins')])"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
what=${1:-all}
shift || true
if [ "$what" = tests ]; then
  TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/test_paged_layer.py tests/test_triton_index.py \
    tests/test_triton_select.py tests/test_kernels.py \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -40
  exit 0
fi
[ "$what" = smollm2 ] || [ "$what" = all ] && python3 bench/serve_gpu.py smollm2 --out "$OUT" "$@" 2>&1 | tee "$OUT/run_smollm2.log" | grep -v "^\[" 
[ "$what" = llama8b ] || [ "$what" = all ] && python3 bench/serve_gpu.py llama8b --backends shplb,flashinfer --out "$OUT" "$@" 2>&1 | tee "$OUT/run_llama8b.log" | grep -v "^\["
exit 0
