"""Generate helm/outrider/values.schema.json (the chart's strict values schema).

    python deploy/chart_schema.py            # rewrite the file
    python deploy/chart_schema.py --check    # exit 1 if the file is out of date (tests run this)

The schema has two sources, both here:

- the Kubernetes/KubeRay/Serve parts of the values (image, head, worker groups, service, serve),
  written below with ``additionalProperties: false`` on every mapping, integer GPU counts and
  non-negative replica counts;
- the ``outrider`` part, generated from outrider's config structs
  (``msgspec.json.schema(OutriderConfig)``): the same structs ``load_config`` uses, so the chart
  has no second copy of outrider's schema to drift. Ranges that the structs check in code
  (e.g. ``tensor_parallel_size >= 1``) are checked by ``load_config`` when Serve builds the app,
  and by ``deploy/check_serve_config.py`` on ``helm template`` output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "outrider"
SCHEMA_PATH = CHART_DIR / "values.schema.json"

DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def _obj(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": False, **extra}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/$defs/{name}"}


STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_LIST = {"type": "array", "items": {"type": "object"}}
FREE_OBJECT = {"type": "object"}
NON_NEGATIVE_INT = {"type": "integer", "minimum": 0}

K8S_DEFS: dict[str, Any] = {
    "quantity": {
        "description": 'A Kubernetes resource quantity, e.g. "4", 16Gi, 500m.',
        "type": ["string", "number"],
    },
    "resourceList": {
        "type": "object",
        "properties": {
            "nvidia.com/gpu": {
                "description": "GPUs per pod: a whole number.",
                "type": "integer",
                "minimum": 0,
            }
        },
        "additionalProperties": _ref("quantity"),
    },
    "resources": _obj(
        {
            "limits": _ref("resourceList"),
            "requests": _ref("resourceList"),
            "claims": OBJECT_LIST,
        }
    ),
}

# Pod settings shared by the head and the worker groups (the ray-cluster chart's names).
_POD_PROPS: dict[str, Any] = {
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
    "serviceAccountName": {"type": "string"},
    "rayStartParams": {
        "description": "`ray start` flags; values are strings, as in the RayCluster CRD.",
        **STRING_MAP,
    },
    "containerEnv": OBJECT_LIST,
    "envFrom": OBJECT_LIST,
    "resources": _ref("resources"),
    "nodeSelector": STRING_MAP,
    "tolerations": OBJECT_LIST,
    "affinity": FREE_OBJECT,
    "podSecurityContext": FREE_OBJECT,
    "securityContext": FREE_OBJECT,
    "volumes": OBJECT_LIST,
    "volumeMounts": OBJECT_LIST,
    "sidecarContainers": OBJECT_LIST,
}

_GROUP_PROPS: dict[str, Any] = {
    "disabled": {"type": "boolean"},
    "pool": {
        "description": "The outrider worker group this Ray worker group hosts.",
        "enum": ["target", "drafter", ""],
    },
    "poolSlots": {
        "description": "Units of the pool's Ray resource per pod (default: the GPU limit).",
        "type": ["integer", "null"],
        "minimum": 1,
    },
    "rayResources": {
        "description": "More Ray custom resources of these pods (whole units).",
        "type": "object",
        "additionalProperties": NON_NEGATIVE_INT,
    },
    "replicas": NON_NEGATIVE_INT,
    "minReplicas": NON_NEGATIVE_INT,
    "maxReplicas": NON_NEGATIVE_INT,
    **_POD_PROPS,
}

K8S_DEFS["workerGroup"] = _obj(_GROUP_PROPS)
K8S_DEFS["worker"] = _obj(
    {"groupName": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63}, **_GROUP_PROPS}
)
K8S_DEFS["head"] = _obj(
    {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": FREE_OBJECT,
        **_POD_PROPS,
    }
)

POSITIVE = {"type": "number", "exclusiveMinimum": 0}
NON_NEGATIVE = {"type": "number", "minimum": 0}

# NOTE: only keys that Serve's DeploymentSchema / AutoscalingConfig / BackpressureConfig /
# RayActorOptionsSchema define (tests/deploy checks this against the installed Ray).
K8S_DEFS["serveDeployment"] = _obj(
    {
        "num_replicas": {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]},
        "max_ongoing_requests": {"type": "integer", "minimum": 1},
        "max_queued_requests": {"type": "integer", "minimum": -1},
        "backpressure_config": _obj(
            {
                "status_code": {"enum": [503, 429]},
                "retry_after_s": {"type": ["number", "null"], "minimum": 0},
            }
        ),
        "ray_actor_options": _obj(
            {
                "num_cpus": NON_NEGATIVE,
                "memory": NON_NEGATIVE,
                "resources": {"type": "object", "additionalProperties": NON_NEGATIVE},
            }
        ),
        "graceful_shutdown_wait_loop_s": NON_NEGATIVE,
        "graceful_shutdown_timeout_s": NON_NEGATIVE,
        "health_check_period_s": POSITIVE,
        "health_check_timeout_s": POSITIVE,
        "autoscaling_config": {
            "anyOf": [
                _obj(
                    {
                        "min_replicas": NON_NEGATIVE_INT,
                        "initial_replicas": {"type": ["integer", "null"], "minimum": 0},
                        "max_replicas": {"type": "integer", "minimum": 1},
                        "target_ongoing_requests": POSITIVE,
                        "look_back_period_s": POSITIVE,
                        "upscale_delay_s": NON_NEGATIVE,
                        "downscale_delay_s": NON_NEGATIVE,
                        "downscale_to_zero_delay_s": NON_NEGATIVE,
                        "upscaling_factor": POSITIVE,
                        "downscaling_factor": POSITIVE,
                        "aggregation_function": {"enum": ["mean", "max", "min"]},
                    }
                ),
                {"type": "null"},
            ]
        },
    }
)

TOP_LEVEL: dict[str, Any] = {
    "image": _obj(
        {
            "repository": {"type": "string", "minLength": 1},
            "tag": {"type": "string"},
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        },
        required=["repository"],
    ),
    "nameOverride": {"type": "string"},
    "fullnameOverride": {"type": "string"},
    "imagePullSecrets": {
        "type": "array",
        "items": _obj({"name": {"type": "string"}}, required=["name"]),
    },
    "common": _obj({"containerEnv": OBJECT_LIST}),
    "head": _ref("head"),
    "worker": _ref("worker"),
    "additionalWorkerGroups": {
        "type": "object",
        "propertyNames": {"pattern": DNS_LABEL, "maxLength": 63},
        "additionalProperties": _ref("workerGroup"),
    },
    "service": _obj(
        {
            "enabled": {"type": "boolean"},
            "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "annotations": STRING_MAP,
        }
    ),
    "serve": _obj(
        {
            "proxy_location": {"enum": ["HeadOnly", "EveryNode"]},
            "route_prefix": {"type": "string", "pattern": "^/"},
            "deployment": _ref("serveDeployment"),
        }
    ),
    "outrider": {
        "description": "An outrider config: the Serve application's args (load_config).",
        "$ref": "#/$defs/OutriderConfig",
    },
}


def outrider_defs() -> dict[str, Any]:
    """The JSON schema of outrider's config structs, one def per struct (CamelCase names)."""
    from outrider.cluster.config import OutriderConfig

    schema = msgspec.json.schema(OutriderConfig)
    defs: dict[str, Any] = schema["$defs"]
    clash = sorted(set(defs) & set(K8S_DEFS))
    if clash:
        raise RuntimeError(f"schema def names used twice: {clash}")
    return defs


def build_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "Generated by deploy/chart_schema.py; edit that file, not this one.",
        "title": "outrider chart values",
        "type": "object",
        "properties": TOP_LEVEL,
        "required": ["image", "head", "worker", "service", "serve", "outrider"],
        "additionalProperties": False,
        "$defs": {**K8S_DEFS, **outrider_defs()},
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    want = render()
    if args == ["--check"]:
        have = SCHEMA_PATH.read_text() if SCHEMA_PATH.is_file() else ""
        if have != want:
            print(
                f"{SCHEMA_PATH} is out of date: run python deploy/chart_schema.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if args:
        print("usage: chart_schema.py [--check]", file=sys.stderr)
        return 2
    SCHEMA_PATH.write_text(want)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
