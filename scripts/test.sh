#!/usr/bin/env bash
# Install the project with its test extras (torch pinned to the CPU wheel) and run lint, types and tests.
set -euo pipefail
pip install -q -c scripts/constraints.txt -e ".[test,tensorrt-rtx]"
pip install -q "cuda-python>=12.6"                      # imports without a GPU; the CUDA layer's code path
pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"  # types only: its dependency is the real TensorRT
python scripts/trt_stubs.py
ruff check serve_app scripts tests
mypy
python -m pytest -q -ra "$@"
