#!/usr/bin/env bash
# Speculation on vs off through the whole served stack: start `outrider serve` with each config,
# run the same `outrider bench`, stop it, back to back on one machine.
#   [CONFIGS="embedded-plain embedded-eagle3"] bash benchmarks/serve_bench.sh [concurrency] [num_prompts] [max_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${OUTRIDER_BIN:-.venv/bin/outrider}
C=${1:-4}; N=${2:-16}; T=${3:-64}
for cfg in ${CONFIGS:-embedded-plain embedded-ngram}; do
  log=$(mktemp)
  "$BIN" serve --config "benchmarks/configs/$cfg.yaml" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do grep -q "serving on" "$log" && break; sleep 0.5; done
  echo "== $cfg (concurrency $C, $N prompts, max_tokens $T)"
  "$BIN" bench --url http://127.0.0.1:8123 --concurrency "$C" --num-prompts "$N" \
    --max-tokens "$T" --ignore-eos
  kill -TERM "$pid"; wait "$pid" || true
  rm -f "$log"
done
