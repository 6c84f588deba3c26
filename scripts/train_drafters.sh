#!/usr/bin/env bash
# Train the drafters shipped for SmolLM2-135M-Instruct (drafters/smollm2-135m-instruct), with
# the exact settings used for them. Run on a GPU machine; see docs/drafters.md.
#
#   scripts/train_drafters.sh OUT_ROOT [METHOD ...]      (default methods: eagle3 peagle dflash)
#
# Environment: TARGET (default: the embedded GGUF), DEVICE (cuda), NUM_PROMPTS (3000),
# DATA_SECONDS (150), TRAIN_SECONDS (180), STEPS (3000), OUTRIDER (the CLI to call).
set -euo pipefail
ROOT=${1:?usage: scripts/train_drafters.sh OUT_ROOT [METHOD ...]}
shift
METHODS=("${@:-eagle3 peagle dflash}")
read -r -a METHODS <<< "${METHODS[*]}"
OUTRIDER=${OUTRIDER:-outrider}
TARGET_ARGS=()
if [[ -n "${TARGET:-}" ]]; then TARGET_ARGS=(--target "$TARGET"); fi
for method in "${METHODS[@]}"; do
  extra=()
  if [[ $method == dflash ]]; then extra=(--num-layers 2 --intermediate-size 1024); fi
  $OUTRIDER train-drafter --method "$method" --out "$ROOT/$method" --data-dir "$ROOT/data" \
    "${TARGET_ARGS[@]}" --target-name HuggingFaceTB/SmolLM2-135M-Instruct \
    --device "${DEVICE:-cuda}" --num-prompts "${NUM_PROMPTS:-3000}" --max-new-tokens 384 \
    --max-num-seqs 256 --max-data-seconds "${DATA_SECONDS:-150}" \
    --draft-vocab-size 8192 --num-speculative-tokens 4 \
    --steps "${STEPS:-3000}" --batch-size 16 --max-seq-len 512 --lr 6e-4 \
    --max-train-seconds "${TRAIN_SECONDS:-180}" --checkpoint-every 500 \
    --eval-prompts 0 --no-progress "${extra[@]}"
done
