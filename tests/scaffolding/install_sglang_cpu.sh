#!/usr/bin/env bash
# CI SCAFFOLDING / WORKAROUND — never shipped in the sglang_shplb package.
#
# Installs SGLang 0.5.17 into the CURRENTLY ACTIVE Python environment so that its CPU engine can
# serve on a CPU-only CI machine (torch 2.13.0 CPU build already installed). Idempotent.
#   1. pip install --no-deps sglang==0.5.17 torchvision==0.28.0 (SGLang pins torch 2.11.0 CUDA; we
#      keep the CPU torch 2.13.0 with a constraints file: pip warns, it works).
#   2. SGLang's import-time deps (sglang_cpu_deps.txt) under constraints.txt.
#   3. Guard torchvision's two unguarded register_fake("torchvision::nms"/"qnms") calls, which die
#      on a CPU torch with PyPI's CUDA torchvision.
#   4. A pure-torch `sgl_kernel` stand-in (sgl_kernel_cpu_stub/) with only the CPU ops SGLang's CPU
#      engine imports (sgl-kernel's CPU build is not on PyPI).
#   pip's stderr goes to a file: shown in full only if pip fails; on success its dependency-conflict
#   report (~35 lines: SGLang's torch 2.11 pin and CUDA-only deps, unmet on purpose) becomes one line, and
#   any conflict not of SGLang's pins is still shown.
#   `install_sglang_cpu.sh --summarise-pip-log FILE` runs that summary alone (tests).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}

# pip's stderr in $1 (pip succeeded): the expected conflicts of SGLang 0.5.17's pins in one line, the
# rest of the stderr as it came.
summarise_pip_log() {
  local n
  n=$(awk '/^ERROR: pip.s (legacy )?dependency resolver /{head = $0; next}
           /^sglang 0\.5\.17 (requires|has requirement) /{n++; next}
           /^torchvision 0\.28\.0 (requires|has requirement) torch[=<>!~ ]/{n++; next}
           {if (head != "") {print head > "/dev/stderr"; head = ""}; print > "/dev/stderr"}
           END{print n + 0}' "$1")
  if [ "$n" -gt 0 ]; then
    echo "install_sglang_cpu.sh: pip reports $n unmet requirements of SGLang 0.5.17 / torchvision 0.28.0:" \
         "expected (SGLang pins torch 2.11, we run the CPU torch 2.13.0; its CUDA-only deps are left out);" \
         "pip's message: $1"
  fi
}

if [ "${1:-}" = "--summarise-pip-log" ]; then
  summarise_pip_log "$2"
  exit 0
fi

pipi() {
  local log rc=0
  log=$(mktemp "${TMPDIR:-/tmp}/install_sglang_cpu.pip.XXXXXX")
  "$PY" -m pip install -q --disable-pip-version-check "$@" 2>"$log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    cat "$log" >&2
    echo "install_sglang_cpu.sh: pip install $* failed (exit $rc); its output above, also in $log" >&2
    return "$rc"
  fi
  if [ -s "$log" ]; then summarise_pip_log "$log"; else rm -f "$log"; fi
}

have_sglang=$("$PY" -c 'import importlib.metadata as m; print(m.version("sglang"))' 2>/dev/null || true)
if [ "$have_sglang" != "0.5.17" ]; then
  pipi --no-deps sglang==0.5.17 torchvision==0.28.0 -c "$here/constraints.txt"
fi
pipi -c "$here/constraints.txt" -r "$here/sglang_cpu_deps.txt"
"$PY" "$here/guard_torchvision.py"
# sgl_kernel stand-in: a plain package copied into site-packages (not an editable link, so it works
# from any checkout); replaced on every run so edits take effect.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -e "$site/sgl_kernel" ] && [ ! -f "$site/sgl_kernel/_SHPLB_CPU_STUB" ]; then
  echo "install_sglang_cpu.sh: a real sgl_kernel is installed in $site; leaving it alone" >&2
else
  rm -rf "$site/sgl_kernel"
  cp -r "$here/sgl_kernel_cpu_stub/sgl_kernel" "$site/sgl_kernel"
  touch "$site/sgl_kernel/_SHPLB_CPU_STUB"
fi
SGLANG_USE_CPU_ENGINE=1 "$PY" -c 'import sglang, sgl_kernel, torchvision; from sglang.srt.entrypoints.engine import Engine; print("sglang", sglang.__version__, "ready on CPU (sgl_kernel stand-in)")'
