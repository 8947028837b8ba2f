#!/usr/bin/env bash
# Builds .whl/one/site.tar.xz, what round 26's job carries: cuDNN's block-sparse attention (nvidia-cudnn-frontend
# 1.28.0) and its CuTe DSL (nvidia-cutlass-dsl 4.6.0 with the cu13 libraries, apache-tvm-ffi 0.1.11) for the
# device's Python 3.12, unpacked into one site directory, pruned of what the block-sparse forward does not import,
# xz -9e (62.0 MiB on 2026-12-07; ~6 min on 2 cores). Run from the repository root (.whl/ is ignored locally).
set -euo pipefail
w=$(mktemp -d)
for p in nvidia-cudnn-frontend==1.28.0 nvidia-cutlass-dsl==4.6.0 nvidia-cutlass-dsl-libs-base==4.6.0 \
         nvidia-cutlass-dsl-libs-core==4.6.0 nvidia-cutlass-dsl-libs-cu13==4.6.0 apache-tvm-ffi==0.1.11; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 -d $w/whl $p
done
mkdir -p $w/site
for f in $w/whl/*.whl; do unzip -q -o $f -d $w/site; done
(cd $w/site && rm -rf include tvm_ffi/include tvm_ffi/src tvm_ffi/3rdparty \
   nvidia_cutlass_dsl/dsl_packages/iket/profiler/libsmodel_injection.so nvidia_cutlass_dsl/cu13/lib/stubs \
   nvidia_cutlass_dsl/cu13/lib/*.a cudnn/gemm cudnn/linear_attention cudnn/deepseek_sparse_attention \
   cudnn/native_sparse_attention)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n' >> .git/info/exclude
mkdir -p .whl/one
tar cf - -C $w/site . | xz -9e -T2 > .whl/one/site.tar.xz
ls -la .whl/one/site.tar.xz
rm -rf $w
