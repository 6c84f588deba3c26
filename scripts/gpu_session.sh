#!/usr/bin/env bash
# GPU work of the acceptance lists in one device call: lanes run in parallel, each on its own
# GPUs, their steps one after the other. Run from the checkout's root on the device machine
# after the devicekit bundles are loaded (tests/gpu/README.md): the Ray/msgspec/gguf bundle in
# /tmp/site, FlashInfer (optional) moved to /tmp/site-fi so that `auto` elsewhere keeps the
# Triton backends, and the peer's model configs in .peer/ (bench_peer). Every step runs under
# one deadline (LIMIT seconds from the start); logs and JSON come back as $OUT/results.tgz.
#
#   bash scripts/gpu_session.sh GPUS:STEP[,STEP...] [GPUS:STEP...]
#   e.g. bash scripts/gpu_session.sh 0:tests 1:kernels,eval 2,3:peer
#
# Steps: tests (tests/gpu but FlashInfer and the cluster), fused, spec (test_spec_perf_cuda),
# fi (FlashInfer attention tests), cluster (test_cluster_gpu), cluster-grpc (its SmolLM2 case with
# the round's calls over gRPC, OUTRIDER_FRAME_SOCKET=0), kernels (bench-kernels),
# eval / eval32 (eval-drafter on the shipped heads, bf16 / float32), peer / peer-goodput
# (bench_peer, outrider side, batches 1-32), sweep-attn (gpu_kernels.py --sweep),
# sweep-moe (gpu_moe.py --sweep), moe-tests / attn-tests (one kernel test file), profile-tgt /
# profile-moe (benchmarks/profile_round.py, EAGLE-3 at batch 1, with a timeline and cProfile),
# skinny (benchmarks/gpu_skinny.py: the skinny GEMM's table, into /tmp/skinny.json, which every
# later step on the machine then uses; skinny-full re-sweeps one row of the target shapes with
# every candidate into the committed table), skinny-tests, engine-tests (the engine, rejection
# and spec-perf GPU tests), kernels-base / kernels-nopdl
# (bench-kernels with the skinny GEMM / PDL off), graph-tests (test_cuda_graph), draft-graph
# (tests/integration/test_eagle3_device_paths.py), peer-ab (bench_peer on the 8B shape at
# batches 1 and 8, drafter on the second GPU, then on the target's), peer-moe (the same for
# Qwen3-30B-A3B), profile-x (profile_round with the drafter on the second GPU),
# profile-pex (the same for P-EAGLE), profile-b8 (EAGLE-3 at batch 8), goodput-tgt /
# goodput-moe (peer-goodput for one target shape), stall-tests (the attention warm-up leaves
# nothing to compile; then, as graph-paths, the CUDA-graph tests and EAGLE-3's device paths:
# draft-step and context graphs against the eager loop), breakdown (bench-kernels' MoE block and
# full steps with each step's kernels by device time; breakdown-nopdl: the 8B step with PDL off,
# so each kernel's time is its own), moe-token (the one-token MoE path's tests
# and tile sweep, benchmarks/gpu_moe_token.py), ab-moe / ab-tgt (bench_peer with this session's
# one-token MoE path and rotary KV write off, then on), ab-attn (bench-kernels' 8B steps at
# batch 1 and 8 with the packages in .ab_old/outrider, then this checkout's; three
# times). STEP@0+1 runs one step on other GPUs
# (here 0 and 1) than its lane's. With only msgspec needed, a one-part bundle will do.
set -u
LIMIT=${LIMIT:-560}
source scripts/device_env.sh
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}
R=$OUT/r
mkdir -p "$R"
GGUF=/tmp/devkit/files/SmolLM2-135M-Instruct.Q4_1.gguf
HEADS=drafters/smollm2-135m-instruct
CLI="python3 -m outrider.cluster.cli"
PYTEST="python3 -m pytest -q -rP -p no:cacheprovider"
END=$((SECONDS + LIMIT))
left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }
step() {  # step NAME CMD...: run CMD under the deadline, output in $R/NAME.log
  local name=$1; shift
  echo "[$(date +%T)] start $name (GPUs $CUDA_VISIBLE_DEVICES)" >>"$R/steps.log"
  timeout --kill-after=5 "$(left)" "$@" >"$R/$name.log" 2>&1
  local rc=$?
  echo "[$(date +%T)] end $name rc=$rc" >>"$R/steps.log"
}
SKINNY=/tmp/skinny.json
run_step() {
  [[ -f $SKINNY ]] && export OUTRIDER_SKINNY_GEMM_CONFIG=$SKINNY
  case $1 in
    tests) step gpu-tests $PYTEST -m gpu tests/gpu --ignore=tests/gpu/test_flashinfer.py \
      --ignore=tests/gpu/test_cluster_gpu.py --junitxml="$R/gpu-tests.xml" ;;
    fused) step fused $PYTEST -m gpu tests/gpu/test_fused_layers.py ;;
    moe-tests) step moe-tests $PYTEST -m gpu tests/gpu/test_triton_moe.py ;;
    attn-tests) step attn-tests $PYTEST -m gpu tests/gpu/test_triton_attention.py ;;
    profile-tgt) step profile-tgt python3 benchmarks/profile_round.py tgt eagle3 --peer-dir .peer \
      --trace "$R/profile-tgt.json.gz" --cprofile ;;
    profile-moe) step profile-moe python3 benchmarks/profile_round.py moe eagle3 --peer-dir .peer \
      --trace "$R/profile-moe.json.gz" --cprofile ;;
    skinny) step skinny python3 benchmarks/gpu_skinny.py --quick --out "$R/skinny.json" \
      && cp "$R/skinny.json" "$SKINNY" ;;
    skinny-tests) step skinny-tests $PYTEST -m gpu tests/gpu/test_skinny_gemm.py ;;
    engine-tests) step engine-tests $PYTEST -m gpu tests/gpu/test_engine_cuda.py \
      tests/gpu/test_triton_rejection.py tests/gpu/test_spec_perf_cuda.py ;;
    graph-tests) step graph-tests $PYTEST -m gpu tests/gpu/test_cuda_graph.py ;;
    draft-graph) step draft-graph $PYTEST -m gpu tests/integration/test_eagle3_device_paths.py ;;
    skinny-full) step skinny-full python3 benchmarks/gpu_skinny.py --rows 1 --shapes 8b.,qwen3. \
      --merge kernels/fused/skinny_gemm_configs/nvidia_h200.json --out "$R/skinny.json" \
      && cp "$R/skinny.json" "$SKINNY" ;;
    kernels-nopdl) step bench-kernels-nopdl env OUTRIDER_PDL=0 $CLI bench-kernels \
      --json "$R/bench_kernels_nopdl.json" ;;
    kernels-base) step bench-kernels-base env OUTRIDER_SKINNY_GEMM=0 $CLI bench-kernels \
      --json "$R/bench_kernels_base.json" ;;
    spec) step spec $PYTEST -m gpu tests/gpu/test_spec_perf_cuda.py ;;
    fi) [[ -d /tmp/site-fi ]] && PYTHONPATH=/tmp/site-fi:$PYTHONPATH step flashinfer \
      $PYTEST -m gpu tests/gpu/test_flashinfer.py -k "not moe" ;;
    cluster) OUT=$R step cluster env OUTRIDER_GGUF="$GGUF" $PYTEST -m gpu \
      tests/gpu/test_cluster_gpu.py ;;
    cluster-grpc) mkdir -p "$R/grpc"; OUT=$R/grpc step cluster-grpc env OUTRIDER_GGUF="$GGUF" \
      OUTRIDER_FRAME_SOCKET=0 $PYTEST -m gpu tests/gpu/test_cluster_gpu.py -k "two_gpus and smollm2" ;;
    kernels) step bench-kernels $CLI bench-kernels --json "$R/bench_kernels.json" ;;
    eval | eval32)
      local dt=auto; [[ $1 == eval32 ]] && dt=float32
      for m in eagle3 peagle dflash; do
        step "$1-$m" $CLI eval-drafter --drafter "$HEADS/$m" --target "$GGUF" --device cuda \
          --dtype $dt --num-prompts 16 --max-tokens 128 --json "$R/$1-$m.json"
      done ;;
    peer) step peer-fixed python3 benchmarks/bench_peer.py --side outrider --peer-dir .peer \
      --batch-sizes 1,4,8,16,32 --json "$R/bench_peer_fixed.json" ;;
    peer-goodput) step peer-goodput python3 benchmarks/bench_peer.py --side outrider \
      --peer-dir .peer --batch-sizes 1,4,8,16,32 --draft-length-policy goodput \
      --json "$R/bench_peer_goodput.json" ;;
    peer-ab) step peer-ab python3 benchmarks/bench_peer.py --side outrider --peer-dir .peer \
      --targets tgt --batch-sizes 1,8 --json "$R/bench_peer_ab.json"
      step peer-same python3 benchmarks/bench_peer.py --side outrider --peer-dir .peer \
      --targets tgt --modes plain,eagle3 --batch-sizes 1,8 --drafter-device cuda:0 \
      --json "$R/bench_peer_same.json" ;;
    peer-moe) step peer-moe python3 benchmarks/bench_peer.py --side outrider --peer-dir .peer \
      --targets moe --batch-sizes 1,8 --json "$R/bench_peer_moe.json" ;;
    profile-x) step profile-x python3 benchmarks/profile_round.py \
      tgt eagle3 --peer-dir .peer \
      --trace "$R/profile-x.json.gz" ;;
    profile-pex) step profile-pex python3 benchmarks/profile_round.py tgt peagle --peer-dir .peer \
      --trace "$R/profile-pex.json.gz" ;;
    goodput-tgt | goodput-moe) step "$1" python3 benchmarks/bench_peer.py --side outrider \
      --peer-dir .peer --targets "${1#goodput-}" --batch-sizes 1,4,8,16,32 \
      --draft-length-policy goodput --json "$R/bench_peer_$1.json" ;;
    profile-b8) step profile-b8 python3 benchmarks/profile_round.py tgt eagle3 --peer-dir .peer \
      --batch 8 --trace "$R/profile-b8.json.gz" ;;
    stall-tests) step stall-tests $PYTEST -m gpu tests/gpu/test_triton_attention.py -k warm_up
      step graph-paths $PYTEST -m gpu tests/gpu/test_cuda_graph.py \
      tests/integration/test_eagle3_device_paths.py ;;
    breakdown) step breakdown $CLI bench-kernels --parts moe,model --shapes qwen3moe \
      --batch-sizes 1,8 --model-shape llama8b --json "$R/breakdown_8b.json"
      step breakdown-moe $CLI bench-kernels --parts model --model-shape qwen3moe \
      --json "$R/breakdown_moe.json" ;;
    breakdown-nopdl) step breakdown-nopdl env OUTRIDER_PDL=0 $CLI bench-kernels --parts model \
      --model-shape llama8b --json "$R/breakdown_nopdl.json" ;;
    ab-moe) for v in 0 1; do
        OUTRIDER_MOE_TOKEN_PATH=$v OUTRIDER_ROTARY_WRITES_KV=$v step "ab-moe-$v" python3 \
          benchmarks/bench_peer.py --side outrider --peer-dir .peer --targets moe \
          --batch-sizes 1,8 --json "$R/bench_peer_ab_moe_$v.json"
      done ;;
    ab-tgt) for v in 0 1; do
        OUTRIDER_ROTARY_WRITES_KV=$v step "ab-tgt-$v" python3 benchmarks/bench_peer.py \
          --side outrider --peer-dir .peer --targets tgt --batch-sizes 1,8 \
          --json "$R/bench_peer_ab_tgt_$v.json"
      done ;;
    moe-token) step moe-token-tests $PYTEST -m gpu tests/gpu/test_triton_moe.py -k token
      OUT=$R step moe-token python3 benchmarks/gpu_moe_token.py --sweep ;;
    ab-attn) for i in 1 2 3; do  # .ab_old/outrider: the packages of the commit to compare with
        step "ab-old-$i" env PYTHONPATH="$PWD/.ab_old:$PYTHONPATH" $CLI bench-kernels \
          --parts model --model-batch-sizes 1,8 --json "$R/ab_old_$i.json"
        step "ab-new-$i" $CLI bench-kernels --parts model --model-batch-sizes 1,8 \
          --json "$R/ab_new_$i.json"
      done ;;
    sweep-attn) OUT=$R step sweep-attn python3 benchmarks/gpu_kernels.py --sweep ;;
    sweep-moe) OUT=$R step sweep-moe python3 benchmarks/gpu_moe.py --sweep ;;
    *) echo "unknown step $1" >>"$R/steps.log" ;;
  esac
}

{ nvidia-smi -L; python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())'; } \
  >"$R/machine.log" 2>&1
for lane in "$@"; do
  (
    export CUDA_VISIBLE_DEVICES=${lane%%:*}
    IFS=, read -ra steps <<<"${lane#*:}"
    for s in "${steps[@]}"; do
      if [[ $s == *@* ]]; then (g=${s#*@}; export CUDA_VISIBLE_DEVICES=${g//+/,}; run_step "${s%@*}")
      else run_step "$s"; fi
    done
  ) &
done
wait
cat "$R/steps.log"
for f in "$R"/*.log; do echo "== $f"; tail -n 6 "$f"; done
tar -czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$R"
