"""deploy/cluster.yaml and deploy/cluster-local.yaml, checked exactly as `ray up` checks them.

`ray up` runs ``prepare_config`` (defaults, setup-command merge, docker and node-type checks)
and then ``validate_config`` (Ray's ray-schema.json) before it talks to any cloud; the tests do
the same with the pinned Ray, then check that the pools the launcher creates are the ones the
outrider config in deploy/serve.yaml places its worker groups on.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from outrider.cluster.config import OutriderConfig, load_config

ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def _ray_up_check(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a cluster config before contacting a provider."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _outrider(serve_yaml: dict[str, Any]) -> OutriderConfig:
    (app,) = serve_yaml["applications"]
    return load_config(None, app["args"])


def test_ray_pinned() -> None:
    assert ray.__version__ == "2.60.0"


def test_aws_cluster_passes_ray_up_validation() -> None:
    prepared = _ray_up_check(_load("cluster.yaml"))
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "target_gpu_node", "draft_gpu_node"}
    assert prepared["head_node_type"] == "head"


def test_aws_validation_is_real() -> None:
    """The same check rejects a fractional pool resource and an unknown node-type key."""
    config = _load("cluster.yaml")
    bad = copy.deepcopy(config)
    bad["available_node_types"]["target_gpu_node"]["resources"]["target_gpu"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        _ray_up_check(bad)
    typo = copy.deepcopy(config)
    typo["available_node_types"]["draft_gpu_node"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        _ray_up_check(typo)


def test_aws_pools_match_the_outrider_config(serve_yaml: dict[str, Any]) -> None:
    prepared = _ray_up_check(_load("cluster.yaml"))
    cfg = _outrider(serve_yaml)
    assert cfg.speculative is not None
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    need = {
        cfg.target.pool.resource: cfg.target.parallel.world_size,
        cfg.speculative.pool.resource: (
            (cfg.speculative.draft_tensor_parallel_size or cfg.speculative.tensor_parallel_size)
            * cfg.speculative.pipeline_parallel_size
        ),
    }
    assert None not in need and len(need) == 2, "target and drafter need pools of their own"
    autoscaling = serve_yaml["applications"][0]["deployments"][0]["autoscaling_config"]
    for resource, world in need.items():
        pool_types = [t for t in types.values() if resource in t["resources"]]
        assert len(pool_types) == 1, f"exactly one node type advertises {resource}"
        (node,) = pool_types
        res = node["resources"]
        # One unit per GPU: a worker's bundle takes 1 GPU and 1 unit of its pool.
        assert isinstance(res[resource], int) and res[resource] == res["GPU"] >= 1
        assert resource not in head["resources"] and head["resources"].get("GPU", 0) == 0
        # The node type's min_workers hold one Serve replica's group, its max_workers the
        # Serve autoscaler's max_replicas.
        assert node["min_workers"] * res[resource] >= world
        assert node["max_workers"] * res[resource] >= world * autoscaling["max_replicas"]
    other = {r for t in types.values() for r in t["resources"]} - {"CPU", "GPU", *need}
    assert not other, f"resources no outrider group uses: {other}"


def test_aws_setup_installs_outrider_and_head_deploys_serve_yaml() -> None:
    prepared = _ray_up_check(_load("cluster.yaml"))
    assert prepared["file_mounts"] == {"~/outrider": "."}
    install = "pip install -q ~/outrider"
    assert install in prepared["head_setup_commands"]
    assert install in prepared["worker_setup_commands"]
    for name in ("target_gpu_node", "draft_gpu_node"):
        # A node type's own setup commands replace the global ones: they must install too.
        assert install in prepared["available_node_types"][name]["worker_setup_commands"]
    head = prepared["head_start_ray_commands"]
    assert any("ray start --head" in c for c in head)
    (deploy,) = [c for c in head if "serve deploy" in c]
    assert "~/outrider/deploy/serve.yaml" in deploy
    assert head.index(deploy) > max(i for i, c in enumerate(head) if "ray start --head" in c)


def test_local_cluster_passes_ray_up_validation() -> None:
    config = _load("cluster-local.yaml")
    assert "available_node_types" not in config
    prepared = _ray_up_check(config)
    (node_type,) = prepared["available_node_types"]
    assert prepared["available_node_types"][node_type]["max_workers"] == len(
        config["provider"]["worker_ips"]
    )


def _pool_map(command: str) -> dict[str, str]:
    words = command.split("pool-resources.sh", 1)[1].split(")", 1)[0].split()
    return dict(w.split("=", 1) for w in words)


def _fake_node(tmp_path: Path, ips: str, gpus: int) -> dict[str, str]:
    """Environment of a fake worker node: its addresses, its GPUs, a `ray` that prints argv."""
    fake = tmp_path / "bin"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "hostname").write_text(f"#!/bin/sh\necho '{ips}'\n")
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(gpus))
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\n{lines}")
    (fake / "ray").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    if not (home / "outrider").exists():
        (home / "outrider").symlink_to(REPO)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "HOME": str(home)}
    env["RAY_HEAD_IP"] = "10.0.0.10"
    env.pop("OUTRIDER_POOL_UNITS", None)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)


def _ray_start_resources(command: str, env: dict[str, str]) -> dict[str, Any]:
    """Run the worker's start command as the launcher does (bash -c) and read --resources."""
    out = _run(["bash", "-c", command], env)
    assert out.returncode == 0, out.stderr
    (flag,) = [a for a in out.stdout.splitlines() if a.startswith("--resources=")]
    resources: dict[str, Any] = json.loads(flag.split("=", 1)[1])
    return resources


def test_local_workers_advertise_their_pool(tmp_path: Path, serve_yaml: dict[str, Any]) -> None:
    config = _load("cluster-local.yaml")
    prepared = _ray_up_check(config)
    (start,) = [c for c in prepared["worker_start_ray_commands"] if "ray start" in c]
    pools = _pool_map(start)
    cfg = _outrider(serve_yaml)
    assert cfg.speculative is not None
    assert sorted(pools.values()) == sorted(
        [cfg.target.pool.resource, cfg.speculative.pool.resource]
    )
    assert sorted(pools) == sorted(config["provider"]["worker_ips"])
    target_ip = next(ip for ip, r in pools.items() if r == cfg.target.pool.resource)
    draft_ip = next(ip for ip, r in pools.items() if r == cfg.speculative.pool.resource)
    # The node's own addresses decide its pool; one unit per GPU, as an integer JSON value.
    env = _fake_node(tmp_path / "t", f"192.168.1.5 {target_ip}", gpus=8)
    assert _ray_start_resources(start, env) == {cfg.target.pool.resource: 8}
    env = _fake_node(tmp_path / "d", draft_ip, gpus=1)
    assert _ray_start_resources(start, env) == {cfg.speculative.pool.resource: 1}
    # A longer address that merely starts with a listed one is another node: no pool.
    env = _fake_node(tmp_path / "n", target_ip + "0", gpus=8)
    assert _ray_start_resources(start, env) == {}


def test_local_pool_node_without_gpus_fails(tmp_path: Path) -> None:
    env = _fake_node(tmp_path, "10.1.1.1", gpus=0)
    out = _run(["bash", str(DEPLOY / "pool-resources.sh"), "10.1.1.1=target_gpu"], env)
    assert out.returncode == 1 and "no GPUs" in out.stderr
    bad = _run(["bash", str(DEPLOY / "pool-resources.sh"), "10.1.1.1"], env)
    assert bad.returncode == 2 and "IP=RESOURCE" in bad.stderr
