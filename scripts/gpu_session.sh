#!/usr/bin/env bash
# The GPU work of the acceptance lists in one device call, lanes in parallel on separate GPUs.
# Run from the checkout's root on the device machine after the devicekit bundles are loaded
# (tests/gpu/README.md): the Ray/msgspec/gguf bundle in /tmp/site, FlashInfer (optional) moved
# to /tmp/site-fi so that `auto` elsewhere keeps the Triton backends, and the peer's configs in
# .peer/ (bench_peer). Every step runs under one deadline (LIMIT seconds from the start); logs
# and JSON land in $OUT/r and come back as $OUT/results.tgz.
#
#   bash scripts/gpu_session.sh LANE[,LANE...]    # lanes: eval tests kernels fi peer peer-goodput
#                                                 #        cluster
set -u
LANES=",${1:-eval,tests,kernels,peer},"
LIMIT=${LIMIT:-560}
source scripts/device_env.sh
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
R=$OUT/r
mkdir -p "$R"
GGUF=/tmp/devkit/files/SmolLM2-135M-Instruct.Q4_1.gguf
HEADS=drafters/smollm2-135m-instruct
END=$((SECONDS + LIMIT))
left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }
CLI="python3 -m outrider.cluster.cli"
step() {  # step NAME CMD...: run CMD under the deadline, output in $R/NAME.log
  local name=$1; shift
  echo "[$(date +%T)] start $name" >>"$R/steps.log"
  timeout --kill-after=5 "$(left)" "$@" >"$R/$name.log" 2>&1
  local rc=$?
  echo "[$(date +%T)] end $name rc=$rc" >>"$R/steps.log"
}
has() { [[ $LANES == *",$1,"* ]]; }

{ nvidia-smi -L; python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())'; } \
  >"$R/machine.log" 2>&1
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
gpu() { echo $(($1 % NGPU)); }
PAIR="$(gpu 2),$(gpu 3)"
[[ $NGPU -lt 4 ]] && PAIR="0,$(gpu 1)"

if has tests; then (
  export CUDA_VISIBLE_DEVICES=$(gpu 0)
  step gpu-tests python3 -m pytest -m gpu tests/gpu -q -rP -p no:cacheprovider \
    --ignore=tests/gpu/test_flashinfer.py --ignore=tests/gpu/test_cluster_gpu.py \
    --junitxml="$R/gpu-tests.xml"
) & fi

if has kernels || has eval || has fi; then (
  export CUDA_VISIBLE_DEVICES=$(gpu 1)
  if has kernels; then
    step bench-kernels $CLI bench-kernels --json "$R/bench_kernels.json"
  fi
  if has eval; then
    for m in eagle3 peagle dflash; do
      step "eval-$m" $CLI eval-drafter --drafter "$HEADS/$m" --target "$GGUF" --device cuda \
        --num-prompts 16 --max-tokens 128 --json "$R/eval-$m.json"
    done
  fi
  if has fi && [[ -d /tmp/site-fi ]]; then
    PYTHONPATH=/tmp/site-fi:$PYTHONPATH step flashinfer python3 -m pytest -m gpu \
      tests/gpu/test_flashinfer.py -k "not moe" -q -rP -p no:cacheprovider
  fi
) & fi

if has peer || has peer-goodput; then (
  export CUDA_VISIBLE_DEVICES=$PAIR
  if has peer; then
    step peer-fixed python3 benchmarks/bench_peer.py --side outrider --peer-dir .peer \
      --batch-sizes 1,4,8,16,32 --json "$R/bench_peer_fixed.json"
  fi
  if has peer-goodput; then
    step peer-goodput python3 benchmarks/bench_peer.py --side outrider --peer-dir .peer \
      --batch-sizes 1,4,8,16,32 --draft-length-policy goodput --json "$R/bench_peer_goodput.json"
  fi
) & fi

if has cluster; then (
  step cluster env OUTRIDER_GGUF="$GGUF" python3 -m pytest -m gpu tests/gpu/test_cluster_gpu.py \
    -q -rP -x -p no:cacheprovider
) & fi

wait
tar -czf "$OUT/results.tgz" -C "$OUT" r
cat "$R/steps.log"
for f in "$R"/*.log; do echo "== $f"; tail -n 8 "$f"; done
