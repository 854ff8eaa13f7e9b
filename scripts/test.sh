#!/usr/bin/env bash
# Install the project with its test extras (torch pinned to the CPU wheel) and run lint, types and tests.
set -euo pipefail
pip install -q -c constraints.txt -e ".[test,tensorrt-rtx]"
ruff check serve_app scripts tests
mypy
python -m pytest -q -ra "$@"
