"""helm/outrider rendered and linted by Helm's own engine (helm-python-sdk bundles Helm v4).

The rendered RayService is validated against KubeRay's CRD schema (strict, as the API server
would with unknown fields rejected), core objects with kubernetes-validate, and serveConfigV2
with Serve's schema, the unknown-key checker and outrider's load_config.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
import yaml

from outrider.cluster.config import OutriderConfig, load_config
from outrider.cluster.serve import resolve_serve_config

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "outrider"
MULTINODE = CHART / "ci" / "multinode-tp-values.yaml"
# The chart declares kubeVersion >=1.25; check the oldest and the newest schemas we have.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def _values_files() -> dict[str, dict[str, Any] | None]:
    return {"default": None, "multinode-tp": yaml.safe_load(MULTINODE.read_text())}


VALUES = _values_files()


def _one(rendered: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (obj,) = [o for docs in rendered.values() for o in docs if o["kind"] == kind]
    return obj


def _serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    raw = rayservice["spec"]["serveConfigV2"]
    assert isinstance(raw, str)
    config: dict[str, Any] = yaml.safe_load(raw)
    return config


def _args(rayservice: dict[str, Any]) -> dict[str, Any]:
    (app,) = _serve_config(rayservice)["applications"]
    args: dict[str, Any] = app["args"]
    return args


def _groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    specs = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return {g["groupName"]: g for g in specs}


def _ray_resources(group: dict[str, Any]) -> dict[str, Any]:
    """rayStartParams.resources read the way KubeRay reads it (surrounding quotes trimmed)."""
    raw = group["rayStartParams"]["resources"]
    resources: dict[str, Any] = json.loads(raw.strip("'\"` "))
    return resources


# -- rendering and lint --------------------------------------------------------------------------


@pytest.mark.parametrize("which", VALUES)
def test_renders_a_rayservice_and_a_service(render: Any, which: str) -> None:
    rendered = render(VALUES[which])
    kinds = sorted(o["kind"] for docs in rendered.values() for o in docs)
    assert kinds == ["RayService", "Service"]
    rs = _one(rendered, "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    assert set(_groups(rs)) == {"target", "drafter"}


@pytest.mark.parametrize("which", VALUES)
def test_lint_is_clean(helm: ModuleType, which: str) -> None:
    report = helm.lint(str(CHART), VALUES[which], strict=True)
    assert report["total_charts_linted"] == 1
    assert not report["errors"], report
    assert all(m["severity"] < 2 for m in report["messages"]), report["messages"]


def test_lint_reports_schema_violations(helm: ModuleType) -> None:
    report = helm.lint(str(CHART), {"worker": {"replica": 2}}, strict=True)
    assert any("replica" in m["error"] for m in report["messages"] if m["severity"] >= 3), report


def test_values_schema_is_generated_from_outrider_structs(chart_schema: ModuleType) -> None:
    assert chart_schema.main(["--check"]) == 0, "run: python deploy/chart_schema.py"
    schema = json.loads((CHART / "values.schema.json").read_text())
    generated = msgspec.json.schema(OutriderConfig)
    assert schema["properties"]["outrider"]["$ref"] == generated["$ref"]
    for name, sub in generated["$defs"].items():
        assert schema["$defs"][name] == sub


# -- KubeRay CRD ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", VALUES)
def test_rayservice_passes_the_crd_schema(render: Any, rayservice_crd: Any, which: str) -> None:
    rs = _one(render(VALUES[which]), "RayService")
    assert rayservice_crd.kind == "RayService"
    assert rayservice_crd.errors(rs) == []


def test_crd_check_is_strict_and_sound(
    render: Any, rayservice_crd: Any, kuberay_sample: dict[str, Any]
) -> None:
    # KubeRay's own sample passes the strict check...
    assert rayservice_crd.errors(kuberay_sample) == []
    rs = _one(render(), "RayService")
    # ...an unknown field, a non-string ray start param and a negative type do not.
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    assert any("'replica' was unexpected" in e for e in rayservice_crd.errors(bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 1
    assert any("num-gpus" in e and "not of type 'string'" in e for e in rayservice_crd.errors(bad))
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolicy"
    ] = ["Always"]
    assert rayservice_crd.errors(bad)


# -- core objects --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", VALUES)
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_core_objects_pass_kubernetes_validate(render: Any, which: str, kube: str) -> None:
    rendered = render(VALUES[which])
    svc = _one(rendered, "Service")
    kubernetes_validate.validate(svc, kube, strict=True)
    rs = _one(rendered, "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    templates = {"head": cluster["headGroupSpec"]["template"]}
    templates.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    for name, template in templates.items():
        pod_template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{rs['metadata']['name']}-{name}"},
            "template": template,
        }
        kubernetes_validate.validate(pod_template, kube, strict=True)


def test_kubernetes_validate_is_strict(render: Any) -> None:
    svc = _one(render(), "Service")
    svc["spec"]["ports"][0]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, KUBE_VERSIONS[0], strict=True)


def test_service_fronts_the_serve_port_of_the_head(render: Any) -> None:
    rendered = render()
    svc, rs = _one(rendered, "Service"), _one(rendered, "RayService")
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] == 8000
    assert _serve_config(rs)["http_options"]["port"] == 8000
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    (container,) = head["spec"]["containers"]
    assert {"name": "serve", "containerPort": 8000} in container["ports"]
    selector = svc["spec"]["selector"]
    assert selector.pop("ray.io/node-type") == "head"
    assert selector.pop("ray.io/serve") == "true"
    assert selector.items() <= head["metadata"]["labels"].items()


def test_names_fit_kuberay_limits(render: Any) -> None:
    long = "a" * 53  # Helm's own release-name limit
    rendered = render(name=long)
    rs, svc = _one(rendered, "RayService"), _one(rendered, "Service")
    # KubeRay: RayService names <= 47 (it appends 6 for the RayCluster, and "-serve-svc").
    assert len(rs["metadata"]["name"]) <= 47 and len(svc["metadata"]["name"]) <= 53
    assert _one(render(name="outrider"), "RayService")["metadata"]["name"] == "outrider"
    assert _one(render(name="prod"), "RayService")["metadata"]["name"] == "prod-outrider"


def test_release_name_that_is_no_dns_1035_label_fails(chart: Any, helm: ModuleType) -> None:
    with pytest.raises(helm.HelmRenderError, match="DNS-1035"):
        chart.render(None, name="7b", namespace="llm")


# -- pools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", VALUES)
def test_worker_groups_advertise_the_pools_outrider_uses(render: Any, which: str) -> None:
    rs = _one(render(VALUES[which]), "RayService")
    cfg = load_config(None, _args(rs))
    assert cfg.speculative is not None
    groups = _groups(rs)
    for name, resource, world in (
        ("target", cfg.target.pool.resource, cfg.target.parallel.world_size),
        (
            "drafter",
            cfg.speculative.pool.resource,
            cfg.speculative.tensor_parallel_size * cfg.speculative.pipeline_parallel_size,
        ),
    ):
        group = groups[name]
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert isinstance(gpus, int) and gpus >= 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert _ray_resources(group) == {resource: gpus}
        # Shell-quoted for KubeRay's `ray start ... --resources=<value>` command line.
        compact = json.dumps({resource: gpus}, separators=(",", ":"))
        assert group["rayStartParams"]["resources"] == f"'{compact}'"
        assert group["maxReplicas"] * gpus >= world
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"outrider/pool": name}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "resources" not in head["rayStartParams"]


@pytest.mark.parametrize("which", VALUES)
def test_ray_autoscaler_sees_the_pools(render: Any, which: str) -> None:
    """Ray's KubeRay autoscaler derives its node types from the RayCluster spec (and validates
    them with validate_config): the pools must reach it as integer custom resources."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    rs = _one(render(VALUES[which]), "RayService")
    cfg = load_config(None, _args(rs))
    assert cfg.speculative is not None
    ray_cr = {
        "metadata": {"name": rs["metadata"]["name"], "namespace": "llm"},
        "spec": rs["spec"]["rayClusterConfig"],
    }
    node_types = _derive_autoscaling_config_from_ray_cr(ray_cr)["available_node_types"]
    for name, resource in (
        ("target", cfg.target.pool.resource),
        ("drafter", cfg.speculative.pool.resource),
    ):
        group = _groups(rs)[name]
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        node = node_types[name]
        assert node["resources"]["GPU"] == gpus
        assert node["resources"][resource] == gpus
        assert (node["min_workers"], node["max_workers"]) == (
            group["minReplicas"],
            group["maxReplicas"],
        )
    pools = {cfg.target.pool.resource, cfg.speculative.pool.resource}
    head = node_types["headgroup"]["resources"]
    assert not pools & set(head) and head.get("GPU", 0) == 0


def test_multinode_target_spans_two_pods(render: Any) -> None:
    rs = _one(render(VALUES["multinode-tp"]), "RayService")
    cfg = load_config(None, _args(rs))
    assert cfg.target.parallel.tensor_parallel_size == 8
    assert cfg.target.parallel.pipeline_parallel_size == 2
    target = _groups(rs)["target"]
    assert target["replicas"] == target["minReplicas"] == 2
    assert _ray_resources(target) == {"target_gpu": 8}
    assert cfg.speculative is not None and cfg.speculative.tensor_parallel_size == 2
    assert _ray_resources(_groups(rs)["drafter"]) == {"draft_gpu": 2}


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (
            {"worker": {"maxReplicas": 1, "resources": {"limits": {"nvidia.com/gpu": 4}}}},
            "requests and limits of nvidia.com/gpu must be equal",
        ),
        (
            {
                "worker": {
                    "maxReplicas": 1,
                    "resources": {
                        "limits": {"nvidia.com/gpu": 4},
                        "requests": {"nvidia.com/gpu": 4},
                    },
                }
            },
            "offer 4 units of the target pool (maxReplicas x poolSlots) but outrider.target "
            "needs 8",
        ),
        ({"outrider": {"target": {"pool": {"resource": None}}}}, "outrider.target.pool.resource"),
        ({"outrider": {"speculative": None}}, "outrider.speculative is not set"),
        ({"worker": {"rayStartParams": {"resources": "{}"}}}, "rayResources"),
        ({"additionalWorkerGroups": {"drafter": {"minReplicas": 3}}}, "below minReplicas"),
        ({"worker": {"groupName": "drafter"}}, 'worker group name "drafter" is used twice'),
        ({"worker": {"disabled": True}}, "offer 0 units of the target pool"),
    ],
)
def test_inconsistent_pools_fail_to_render(
    chart: Any, helm: ModuleType, values: dict[str, Any], needle: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as e:
        chart.render(values, name="outrider", namespace="llm")
    assert needle in str(e.value)


def test_extra_ray_resources_and_pool_slots(render: Any) -> None:
    rs = _one(
        render({"worker": {"poolSlots": 16, "rayResources": {"nvlink_domain_a": 1}}}),
        "RayService",
    )
    assert _ray_resources(_groups(rs)["target"]) == {"target_gpu": 16, "nvlink_domain_a": 1}


# -- values typos --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field", "problem"),
    [
        ({"worker": {"replica": 2}}, "/worker", "additional properties 'replica'"),
        ({"head": {"nodeSelecter": {}}}, "/head", "additional properties 'nodeSelecter'"),
        (
            {"additionalWorkerGroups": {"drafter": {"tolerations": {}, "pol": "drafter"}}},
            "/additionalWorkerGroups/drafter",
            "'pol'",
        ),
        (
            {"worker": {"resources": {"limits": {"nvidia.com/gpu": 1.5}}}},
            "/worker/resources/limits/nvidia.com~1gpu",
            "want integer",
        ),
        (
            {
                "additionalWorkerGroups": {
                    "drafter": {"resources": {"requests": {"nvidia.com/gpu": 0.5}}}
                }
            },
            "/additionalWorkerGroups/drafter/resources/requests/nvidia.com~1gpu",
            "want integer",
        ),
        ({"worker": {"replicas": -1}}, "/worker/replicas", "minimum"),
        (
            {"additionalWorkerGroups": {"drafter": {"maxReplicas": -2}}},
            "/additionalWorkerGroups/drafter/maxReplicas",
            "minimum",
        ),
        (
            {"worker": {"rayStartParams": {"num-cpus": 8}}},
            "/worker/rayStartParams/num-cpus",
            "string",
        ),
        (
            {"outrider": {"target": {"parallel": {"tensor_paralel_size": 2}}}},
            "/outrider/target/parallel",
            "'tensor_paralel_size'",
        ),
        (
            {"outrider": {"speculative": {"num_speculative_tokens": 2.5}}},
            "/outrider/speculative/num_speculative_tokens",
            "want integer",
        ),
        (
            {"serve": {"deployment": {"autoscaling_config": {"max_replica": 3}}}},
            "/serve/deployment/autoscaling_config",
            "'max_replica'",
        ),
        (
            {"serve": {"deployment": {"max_ongoing_request": 3}}},
            "/serve/deployment",
            "'max_ongoing_request'",
        ),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "must be one of"),
    ],
)
def test_values_typos_fail_schema_validation_naming_the_field(
    chart: Any, helm: ModuleType, values: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as e:
        chart.validate_schema(values)
    assert f"at '{field}'" in str(e.value) and problem in str(e.value), str(e.value)
    # `helm install` / `helm template` stop at the same check.
    with pytest.raises(helm.HelmValuesError, match=field.replace("~1", ".1")):
        chart.render(values, name="outrider", namespace="llm")


def test_serve_values_only_expose_keys_serve_knows(chart_schema: ModuleType) -> None:
    from ray.serve.config import AutoscalingConfig, BackpressureConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    dep = chart_schema.K8S_DEFS["serveDeployment"]["properties"]
    assert set(dep) <= set(DeploymentSchema.model_fields) - {"name"}
    (auto, _null) = dep["autoscaling_config"]["anyOf"]
    assert set(auto["properties"]) <= set(AutoscalingConfig.model_fields)
    assert set(dep["backpressure_config"]["properties"]) <= set(BackpressureConfig.model_fields)
    assert set(dep["ray_actor_options"]["properties"]) <= set(RayActorOptionsSchema.model_fields)


# -- serveConfigV2: one schema with `outrider serve --config` ------------------------------------


@pytest.mark.parametrize("which", VALUES)
def test_serve_config_v2_passes_serve_and_outrider_checks(
    render: Any, serve_check: ModuleType, which: str
) -> None:
    from ray.serve.schema import ServeDeploySchema

    rs = _one(render(VALUES[which]), "RayService")
    schema = serve_check.check_serve_config(_serve_config(rs))
    assert isinstance(schema, ServeDeploySchema)
    (app,) = schema.applications
    assert app.import_path == "outrider.cluster.app:app_builder"
    assert [d.name for d in app.deployments] == ["outrider"]


def test_default_chart_renders_deploy_serve_yaml(render: Any, serve_yaml: dict[str, Any]) -> None:
    """One example config: `serve deploy deploy/serve.yaml` == the chart's default RayService."""
    assert _serve_config(_one(render(), "RayService")) == serve_yaml


@pytest.mark.parametrize("which", VALUES)
def test_rendered_args_equal_what_outrider_serve_runs(
    chart: Any, render: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    monkeypatch.delenv("OUTRIDER_API_KEY", raising=False)
    values = chart.merge_values(copy.deepcopy(VALUES[which]))
    config_file = tmp_path / "outrider.yaml"
    config_file.write_text(yaml.safe_dump(values["outrider"]))
    cli = resolve_serve_config(
        argparse.Namespace(config=str(config_file), host=None, port=None, api_key=None)
    )
    rs = _one(render(VALUES[which]), "RayService")
    served = load_config(None, _args(rs))
    assert msgspec.to_builtins(served) == msgspec.to_builtins(cli)
    assert msgspec.to_builtins(load_config(config_file)) == msgspec.to_builtins(served)


@pytest.mark.parametrize("which", VALUES)
def test_serve_builds_the_router_from_rendered_args(render: Any, which: str) -> None:
    """What Serve's controller does with the args: the typed builder -> the router's config."""
    import torch
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from outrider.cluster.app import app_builder

    rs = _one(render(VALUES[which]), "RayService")
    threads = torch.get_num_threads()
    try:
        app = call_user_app_builder_with_args_if_necessary(app_builder, _args(rs))
    finally:
        torch.set_num_threads(threads)  # building the deployment sets it to 1
    assert isinstance(app, Application)
    deployment = app._bound_deployment
    assert deployment.name == "outrider"
    (router_config,) = deployment.init_args
    assert router_config == msgspec.to_builtins(load_config(None, _args(rs)))
