#!/usr/bin/env bash
# Lint, format check and type check, as CI runs them: `scripts/lint.sh` from anywhere in the clone.
# Settings live in pyproject.toml ([tool.ruff], [tool.mypy]); `ruff format .` and `ruff check --fix .` fix most findings.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
