"""`serve run deploy/serve.yaml` on a local Ray cluster answers a request.

The test runs Ray Serve's own CLI command (``ray.serve.scripts.cli run CONFIG --non-blocking``,
in-process through click), i.e. the config-file path of `serve run`: ServeDeploySchema, then
``serve_start(http_options, proxy_location)`` and ``client.deploy_apps(config)``, the same
controller path `serve deploy` and KubeRay use (the controller imports the app builder, builds
the app from ``args`` and applies the deployment overrides of the file).

The config is deploy/serve.yaml with only what this CPU machine cannot run replaced: the
embedded model instead of the weights paths, ``device: cpu``, TP=PP=1, a small KV cache, an
n-gram drafter instead of the draft model, and HTTP on 127.0.0.1 at a free port. The pool
resources keep their names from the file and are given to ``ray.init`` as local custom
resources, so each worker group still has to find its own pool.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")


def _for_this_machine(serve_yaml: dict[str, Any], port: int) -> dict[str, Any]:
    cfg = copy.deepcopy(serve_yaml)
    cfg["http_options"] = {**cfg["http_options"], "host": "127.0.0.1", "port": port}
    (app,) = cfg["applications"]
    target, spec = app["args"]["target"], app["args"]["speculative"]
    target["model"] = {"dtype": "float32"}  # no path: the embedded SmolLM2-135M-Instruct
    target["parallel"] = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    target["cache"] = {"memory_gib": 0.5}
    target["device"] = "cpu"
    target["pool"] = {**target["pool"], "num_gpus": 0}
    app["args"]["speculative"] = {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_min": 2,
        "device": "cpu",
        "pool": {**spec["pool"], "num_gpus": 0},
    }
    return cfg


@pytest.mark.slow
def test_serve_run_deploy_serve_yaml_answers_a_request(
    tmp_path: Path,
    serve_yaml: dict[str, Any],
    serve_check: ModuleType,
    wait_serve_app: Callable[..., None],
    free_port: Callable[[], int],
) -> None:
    from click.testing import CliRunner
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.scripts import cli

    port = free_port()
    cfg = _for_this_machine(serve_yaml, port)
    serve_check.check_serve_config(cfg)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = cfg["applications"][0]["args"]
    pools = {args["target"]["pool"]["resource"]: 1, args["speculative"]["pool"]["resource"]: 1}
    assert len(pools) == 2

    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=6,
        resources=pools,
        include_dashboard=False,
        namespace=SERVE_NAMESPACE,
        logging_level=logging.WARNING,
    )
    try:
        result = CliRunner().invoke(cli, ["run", str(path), "--non-blocking"])
        assert result.exit_code == 0, result.output
        wait_serve_app("outrider")

        # Serve applied the deployment settings of the file (not the defaults in code).
        client = serve.context._get_global_client()
        details = client.get_serve_details()["applications"]["outrider"]
        dep = details["deployments"]["outrider"]["deployment_config"]
        want = serve_yaml["applications"][0]["deployments"][0]
        assert dep["max_ongoing_requests"] == want["max_ongoing_requests"]
        assert dep["max_queued_requests"] == want["max_queued_requests"]
        auto = dep["autoscaling_config"]
        for key in ("min_replicas", "max_replicas", "target_ongoing_requests"):
            assert auto[key] == want["autoscaling_config"][key]

        # Each worker group (placement group "outrider-<role>-<id>") sits on its own pool.
        bundles = {
            pg["name"].rsplit("-", 1)[0]: list(pg["bundles"].values())
            for pg in ray.util.placement_group_table().values()
            if pg["name"].startswith("outrider-") and pg["state"] == "CREATED"
        }
        assert bundles == {
            "outrider-target": [{"CPU": 1.0, args["target"]["pool"]["resource"]: 1.0}],
            "outrider-drafter": [{"CPU": 1.0, args["speculative"]["pool"]["resource"]: 1.0}],
        }

        api = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120
        )
        model = args["server"]["served_model_name"]
        assert [m.id for m in api.models.list().data] == [model]
        out = api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Repeat: red blue red blue red blue"}],
            temperature=0,
            max_tokens=12,
        )
        assert out.choices[0].message.content
        assert out.usage is not None and 0 < out.usage.completion_tokens <= 12
    finally:
        serve.shutdown()
        ray.shutdown()
