#!/usr/bin/env bash
# The suite on the latest releases: a throwaway venv, the CPU torch wheel first, then
# steersample[test] with no constraints (pip picks the newest diffusers, transformers,
# safetensors, ...), then the README's test command. Run it before landing; when it fails and
# .ci/run (constraints.txt) passes, a new release broke something: fix it, then refresh the pins
# with `.venv/bin/python scripts/freeze_constraints.py > constraints.txt` from a venv that passed.
#
#   scripts/test_latest.sh [pytest args]      e.g. scripts/test_latest.sh -x tests/pipelines
#
# The venv lives in a temporary folder and is removed on exit (KEEP_VENV=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d -t steersample-latest.XXXXXX)"
if [ "${KEEP_VENV:-0}" != "1" ]; then trap 'rm -rf "$venv"' EXIT; fi
echo "== latest releases in $venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0 || "$venv/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu
# a fresh venv holds nothing else, so every dependency resolves to its newest release (torch
# stays at the CPU wheel installed above, which satisfies the project's torch>=2.4)
"$venv/bin/pip" install -q -e ".[test]"
"$venv/bin/pip" freeze | grep -i -E '^(torch|diffusers|transformers|safetensors|accelerate|gradio|numpy|faiss-cpu)==' || true
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
