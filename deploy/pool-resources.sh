#!/usr/bin/env bash
# Print the Ray custom resources of this node's outrider pool as JSON, for
# `ray start --resources="$(bash pool-resources.sh IP=RESOURCE ...)"` (deploy/cluster-local.yaml).
#
#   pool-resources.sh 10.0.0.11=target_gpu 10.0.0.13=draft_gpu
#
# The node whose addresses (`hostname -I`) include IP advertises RESOURCE with one unit per GPU
# (`nvidia-smi -L`), e.g. {"target_gpu": 8}; a node that is in no pool prints {}.
# OUTRIDER_POOL_UNITS overrides the unit count (e.g. CPU-only test nodes).
set -euo pipefail

addrs=" $(hostname -I 2>/dev/null || true) "
pool=""
for spec in "$@"; do
  ip=${spec%%=*}
  resource=${spec#*=}
  if [[ -z "$ip" || -z "$resource" || "$spec" != *=* ]]; then
    echo "pool-resources.sh: expected IP=RESOURCE, got '$spec'" >&2
    exit 2
  fi
  if [[ "$addrs" == *" $ip "* ]]; then
    pool=$resource
    break
  fi
done

if [[ -z "$pool" ]]; then
  echo "{}"
  exit 0
fi

units=${OUTRIDER_POOL_UNITS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)}
if ! [[ "$units" =~ ^[0-9]+$ ]] || [[ "$units" -lt 1 ]]; then
  echo "pool-resources.sh: node in pool '$pool' has no GPUs (set OUTRIDER_POOL_UNITS)" >&2
  exit 1
fi
printf '{"%s": %d}\n' "$pool" "$units"
