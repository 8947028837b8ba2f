#!/usr/bin/env bash
# Source on the lent GPU, after ../shared/gpu/README.md's bundle calls (SGLang 0.5.17's site in /tmp/site), from the
# repository root, with .whl/one/site.tar.xz carried (bench/results/gpu_round26/make_site.sh builds it: cuDNN
# frontend 1.28.0, cutlass-dsl 4.6.0, tvm-ffi 0.1.11): unpacks it beside the bundle's site, stubs tvm-ffi's testing
# library when the wheel lacks it, exports PYTHONPATH_EXTRA (bench/serve_gpu.sh's: cutlass-dsl's dsl_packages, which a
# pip install reaches by a .pth file that PYTHONPATH entries do not read) and writes what imports to $1/probe.txt.
#   . bench/cudnn_site.sh /tmp/out
tar xJf .whl/one/site.tar.xz -C /tmp/site
lib=/tmp/site/tvm_ffi/lib
[ -e $lib/libtvm_ffi_testing.so ] || { nm -D --undefined-only /tmp/site/tvm_ffi/core.abi3.so | awk '{print $2}' |
  grep -i testing | sed 's/.*/int &(void) { return 0; }/' > /tmp/stub.c &&
  gcc -shared -fPIC -o $lib/libtvm_ffi_testing.so /tmp/stub.c; }
export PYTHONPATH_EXTRA=/tmp/site/nvidia_cutlass_dsl/dsl_packages
PYTHONPATH=/tmp/site:$PYTHONPATH_EXTRA python3 -c "import cudnn, cutlass; \
from cudnn.block_sparse_attention import block_sparse_attention_forward; print('cudnn frontend', cudnn.__version__)" \
  2>&1 | tail -n 3 | tee "${1:-/tmp/out}/probe.txt"
