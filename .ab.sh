bash .devkit-m/load.sh >/dev/null 2>&1
source scripts/device_env.sh
export PYTHONUNBUFFERED=1
B="python3 benchmarks/bench_peer.py --side outrider --peer-dir .peer --targets tgt --modes eagle3 --batch-sizes 1 --tokens 64"
run() { local name=$1; shift; local t0=$SECONDS; timeout 42 env "$@" $B --json $OUT/$name.json >$OUT/$name.log 2>&1; echo "$name rc=$? $((SECONDS-t0))s"; grep -E "^\| Llama-3.1-8B \| eagle3" $OUT/$name.log | head -2; }
run default A=1
run nopdl OUTRIDER_PDL=0
run nographs OUTRIDER_DRAFT_GRAPHS=0
t0=$SECONDS; timeout 42 $B --drafter-device cuda:0 --json $OUT/samegpu.json >$OUT/samegpu.log 2>&1; echo "samegpu rc=$? $((SECONDS-t0))s"; grep -E "^\| Llama-3.1-8B \| eagle3" $OUT/samegpu.log | head -2
