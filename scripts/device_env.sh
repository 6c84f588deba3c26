# Source on the GPU machine from the checkout's root: the devicekit site packages plus this
# checkout importable as `outrider` (the image cannot pip-install it). See tests/gpu/README.md.
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
mkdir -p /tmp/ns/outrider
for p in cluster workers kernels train; do ln -sfn "$PWD/$p" "/tmp/ns/outrider/$p"; done
export PYTHONPATH=/tmp/ns:$PYTHONPATH
