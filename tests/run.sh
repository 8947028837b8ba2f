#!/usr/bin/env bash
# The test command (README): SGLang-on-CPU test scaffolding, then the suite.
# Run inside the environment the README's install command made.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/scaffolding/install_sglang_cpu.sh
python -m pytest -q tests --ignore=tests/test_serving_engine.py --ignore=tests/test_serving_tp.py --ignore=tests/test_eval_servers.py --ignore=tests/test_serving_stock.py
# the real SGLang engine/server tests run in a pytest process of their own
# (Engine.shutdown() kills every child of its process)
python -m pytest -q tests/test_serving_engine.py tests/test_serving_tp.py tests/test_eval_servers.py tests/test_serving_stock.py
bash tests/scaffolding/lint_docker.sh
