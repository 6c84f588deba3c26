"""Shared pieces of the deploy tests: the repo's deploy tools, Helm rendering, CRD schemas."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = REPO / "helm" / "outrider"
# NOTE: reference data beside the repository (never copied into it).
KUBERAY_DATA = REPO.parent / "shared" / "data" / "kuberay"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def serve_check() -> ModuleType:
    """deploy/check_serve_config.py, the unknown-key + load_config checker."""
    return _load("outrider_deploy_check_serve_config", DEPLOY / "check_serve_config.py")


@pytest.fixture(scope="session")
def chart_schema() -> ModuleType:
    """deploy/chart_schema.py, which generates helm/outrider/values.schema.json."""
    return _load("outrider_deploy_chart_schema", DEPLOY / "chart_schema.py")


@pytest.fixture(scope="session")
def serve_yaml() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "serve.yaml").read_text())


@pytest.fixture(scope="session")
def helm() -> ModuleType:
    return pytest.importorskip("helm_python")


@pytest.fixture(scope="session")
def chart(helm: ModuleType) -> Any:
    loaded = helm.Chart.load(str(CHART))
    yield loaded
    loaded.close()


Render = Callable[..., dict[str, list[dict[str, Any]]]]


@pytest.fixture(scope="session")
def render(chart: Any) -> Render:
    """render(values, name=...) -> {template file: [parsed objects]} with Helm's engine."""

    def run(
        values: dict[str, Any] | None = None, *, name: str = "outrider", namespace: str = "llm"
    ) -> dict[str, list[dict[str, Any]]]:
        out = chart.render(copy.deepcopy(values), name=name, namespace=namespace)
        return {
            path.split("/", 1)[1]: [d for d in yaml.safe_load_all(text) if d]
            for path, text in out.items()
            if path.endswith(".yaml")
        }

    return run


# -- KubeRay CRD schemas, validated like the API server (../shared/data/kuberay/SOURCE.txt) ----


def _strict(node: Any) -> None:
    """Rewrite an openAPIV3Schema in place: nullable -> null-admitting type, closed objects."""
    if not isinstance(node, dict):
        return
    if node.pop("nullable", False):
        t = node.get("type")
        if isinstance(t, str):
            node["type"] = [t, "null"]
        if "enum" in node and None not in node["enum"]:
            node["enum"] = [*node["enum"], None]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for sub in (node.get("properties") or {}).values():
        _strict(sub)
    for key in ("items", "additionalProperties", "not"):
        _strict(node.get(key))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in node.get(key) or []:
            _strict(sub)


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _apply_defaults(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(value) - set(schema.get("properties") or {}):
                _apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _apply_defaults(schema["items"], item)


class CrdValidator:
    """Strict validation of one CRD version's openAPIV3Schema (jsonschema, no CEL rules)."""

    def __init__(self, crd_path: Path, version: str = "v1") -> None:
        import jsonschema

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load(crd_path.read_text(), Loader=loader)
        self.kind = crd["spec"]["names"]["kind"]
        (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
        self.defaults_schema = copy.deepcopy(ver["schema"]["openAPIV3Schema"])
        schema = copy.deepcopy(self.defaults_schema)
        _strict(schema)
        self.validator = jsonschema.Draft7Validator(schema)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        value = _drop_nulls(copy.deepcopy(obj))
        _apply_defaults(self.defaults_schema, value)
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in self.validator.iter_errors(value)
        ]


@pytest.fixture(scope="session")
def rayservice_crd() -> CrdValidator:
    path = KUBERAY_DATA / "ray.io_rayservices.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay RayService CRD not found at {path} (reference data, not in the repo)")
    return CrdValidator(path)


@pytest.fixture(scope="session")
def kuberay_sample() -> dict[str, Any]:
    path = KUBERAY_DATA / "ray-service.text-summarizer.yaml"
    if not path.is_file():
        pytest.skip(f"KubeRay sample not found at {path} (reference data, not in the repo)")
    return yaml.safe_load(path.read_text())
