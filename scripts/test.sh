#!/usr/bin/env bash
# Install the project with its test extras (torch pinned to the CPU wheel) and run lint, types and tests.
set -euo pipefail
pip install -q -c scripts/constraints.txt -e ".[test,tensorrt-rtx]"
pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1" "cuda-python>=12.6" "cuda-bindings>=12.6"
python scripts/trt_stubs.py
ruff check serve_app scripts tests
mypy
python -m pytest -q -ra "$@"
