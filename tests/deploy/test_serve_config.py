"""deploy/serve.yaml: Ray Serve's own schema, the keys Serve would ignore, outrider's args."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from outrider.cluster.config import load_config

pytest.importorskip("ray.serve")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _dep(d: dict[str, Any]) -> dict[str, Any]:
    return d["applications"][0]["deployments"][0]


# Mistakes Serve accepts silently (its models ignore unknown keys); each must be rejected.
IGNORED_BY_SERVE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("top level", lambda d: d.update(proxy_locaton="EveryNode"), "`proxy_locaton`"),
    ("http_options", lambda d: d["http_options"].update(prot=8001), "`http_options.prot`"),
    (
        "application",
        lambda d: d["applications"][0].update(route_prefx="/v2"),
        "`applications[0].route_prefx`",
    ),
    (
        "deployment",
        lambda d: _dep(d).update(max_ongoing_request=4),
        "`applications[0].deployments[0].max_ongoing_request`",
    ),
    (
        "ray_actor_options",
        lambda d: _dep(d)["ray_actor_options"].update(num_gpu=1),
        "`applications[0].deployments[0].ray_actor_options.num_gpu`",
    ),
    (
        "autoscaling_config",
        lambda d: _dep(d)["autoscaling_config"].update(max_replica=8),
        "`applications[0].deployments[0].autoscaling_config.max_replica`",
    ),
]


def test_serve_yaml_passes_serve_schema(serve_yaml: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(serve_yaml)
    (app,) = schema.applications
    assert app.import_path == "outrider.cluster.app:app_builder"
    assert app.route_prefix == "/"
    (dep,) = app.deployments
    assert dep.name == "outrider"


def test_serve_yaml_passes_the_checker(serve_yaml: dict[str, Any], serve_check: ModuleType) -> None:
    serve_check.check_serve_config(serve_yaml)
    (schema,) = serve_check.check_serve_config_file(REPO / "deploy" / "serve.yaml")
    assert isinstance(schema, ServeDeploySchema)


@pytest.mark.parametrize(("level", "mutate", "needle"), IGNORED_BY_SERVE, ids=lambda x: x)
def test_unknown_keys_serve_ignores_are_rejected(
    serve_yaml: dict[str, Any],
    serve_check: ModuleType,
    level: str,
    mutate: Callable[[dict[str, Any]], None],
    needle: str,
) -> None:
    bad = copy.deepcopy(serve_yaml)
    mutate(bad)
    ServeDeploySchema.model_validate(bad)  # Serve itself accepts the typo...
    with pytest.raises(serve_check.ServeConfigError) as e:  # ...the checker does not.
        serve_check.check_serve_config(bad)
    assert len(e.value.problems) == 1
    assert needle in e.value.problems[0] and "unknown key" in e.value.problems[0]


def test_args_are_checked_with_load_config(
    serve_yaml: dict[str, Any], serve_check: ModuleType
) -> None:
    bad = copy.deepcopy(serve_yaml)
    bad["applications"][0]["args"]["speculative"]["num_speculative_tokn"] = 3
    ServeDeploySchema.model_validate(bad)
    with pytest.raises(serve_check.ServeConfigError, match="speculative.num_speculative_tokn"):
        serve_check.check_serve_config(bad)
    bad = copy.deepcopy(serve_yaml)
    bad["applications"][0]["args"]["target"]["parallel"]["tensor_parallel_size"] = 0
    with pytest.raises(serve_check.ServeConfigError, match="tensor_parallel_size` must be >= 1"):
        serve_check.check_serve_config(bad)


def test_overrides_must_name_the_outrider_deployment(
    serve_yaml: dict[str, Any], serve_check: ModuleType
) -> None:
    bad = copy.deepcopy(serve_yaml)
    _dep(bad)["name"] = "OutriderRouter"
    with pytest.raises(serve_check.ServeConfigError, match="'OutriderRouter' is not a deployment"):
        serve_check.check_serve_config(bad)


def test_serve_schema_errors_are_reported(
    serve_yaml: dict[str, Any], serve_check: ModuleType
) -> None:
    bad = copy.deepcopy(serve_yaml)
    _dep(bad)["max_ongoing_requests"] = 0
    with pytest.raises(serve_check.ServeConfigError, match="max_ongoing_requests"):
        serve_check.check_serve_config(bad)


def test_checker_command_line(tmp_path: Path, serve_yaml: dict[str, Any]) -> None:
    import yaml

    script = str(REPO / "deploy" / "check_serve_config.py")
    ok = subprocess.run(
        [sys.executable, script, str(REPO / "deploy" / "serve.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and ok.stdout.strip().endswith(": ok"), ok.stderr
    bad = copy.deepcopy(serve_yaml)
    _dep(bad)["autoscaling_config"]["max_replica"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run(
        [sys.executable, script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 1
    assert "autoscaling_config.max_replica" in out.stderr and len(out.stderr.splitlines()) == 1


def test_deployment_settings_are_consistent(serve_yaml: dict[str, Any]) -> None:
    """The relations the comments in deploy/serve.yaml promise."""
    (app,) = serve_yaml["applications"]
    cfg = load_config(None, app["args"])
    dep = _dep(serve_yaml)
    auto = dep["autoscaling_config"]
    seqs = cfg.scheduler.max_num_seqs
    assert dep["max_ongoing_requests"] == 2 * seqs
    # The engine's queue never rejects what Serve admitted: Serve's queue is the valve.
    assert cfg.server.max_queued_requests >= dep["max_ongoing_requests"] - seqs
    assert dep["max_queued_requests"] > 0 and dep["backpressure_config"]["status_code"] == 503
    assert auto["target_ongoing_requests"] == seqs <= dep["max_ongoing_requests"]
    assert 1 <= auto["min_replicas"] <= auto["initial_replicas"] <= auto["max_replicas"]
    assert auto["downscale_delay_s"] > auto["upscale_delay_s"]
    assert dep["ray_actor_options"] == {"num_cpus": 0}
    assert serve_yaml["http_options"]["host"] == "0.0.0.0"
    assert cfg.speculative is not None
    assert cfg.target.pool.resource and cfg.speculative.pool.resource
    assert cfg.target.pool.resource != cfg.speculative.pool.resource
