"""Check a Ray Serve config for outrider the way Serve should but does not.

    python deploy/check_serve_config.py deploy/serve.yaml
    helm template outrider helm/outrider | python deploy/check_serve_config.py -

The input is a Serve config, or manifests holding RayServices (their serveConfigV2 is checked).

Three checks, all offline:

1. Ray Serve's own ``ServeDeploySchema`` (what ``serve deploy`` / ``serve run`` / KubeRay run).
2. Unknown keys. Serve silently ignores unknown keys in most of its config models
   (applications, deployments, ``ray_actor_options``, ``autoscaling_config``, ...), so a typo
   such as ``max_ongoing_request`` deploys with the default. Every mapping that Serve parses
   into a pydantic model is checked against that model's fields, at every level; the field
   lists come from the installed Ray, so they cannot drift from it.
3. The ``args`` of every application whose ``import_path`` is outrider's app builder are
   validated with ``outrider.cluster.config.load_config``, the one config schema, and its
   deployment overrides may only name the deployment the builder creates (``outrider``).

Exit status 0 when the config passes; otherwise one line per problem and status 1.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

OUTRIDER_IMPORT_PATH = "outrider.cluster.app:app_builder"
OUTRIDER_DEPLOYMENTS = ("outrider",)


class ServeConfigError(ValueError):
    """The config is not one Serve would run as written; ``problems`` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _models_in(annotation: Any) -> list[type]:
    """The pydantic model classes an annotation can hold (through Optional/Union/List/Dict)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    for arg in typing.get_args(annotation):
        out.extend(_models_in(arg))
    return out


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):  # noqa: UP006
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


def _field_names(model: type) -> dict[str, Any]:
    """Accepted keys of a pydantic model (names and string aliases) -> field annotation."""
    names: dict[str, Any] = {}
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        names[name] = field.annotation
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                names[alias] = field.annotation
    return names


def unknown_keys(model: type, data: Any, where: str) -> list[str]:
    """Keys of ``data`` (recursively) that ``model`` would ignore or not know."""
    if not isinstance(data, dict):
        return []
    fields = _field_names(model)
    problems: list[str] = []
    for key, value in data.items():
        at = f"{where}.{key}" if where else str(key)
        if key not in fields:
            allowed = ", ".join(sorted(model.model_fields))  # type: ignore[attr-defined]
            problems.append(f"unknown key `{at}` (Serve would ignore it); allowed keys: {allowed}")
            continue
        models = _models_in(fields[key])
        if len(models) != 1:
            # NOTE: free-form mappings (args, runtime_env, user_config) are not Serve's to check.
            continue
        if isinstance(value, list) and _is_list(fields[key]):
            for i, item in enumerate(value):
                problems.extend(unknown_keys(models[0], item, f"{at}[{i}]"))
        elif isinstance(value, dict):
            problems.extend(unknown_keys(models[0], value, at))
    return problems


def check_serve_config(data: Any) -> Any:
    """Validate a parsed Serve config; returns Serve's ``ServeDeploySchema`` of it.

    Raises ServeConfigError listing every problem found.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from outrider.cluster.config import ConfigError, load_config

    if not isinstance(data, dict):
        raise ServeConfigError(["a Serve config must be a mapping at the top level"])
    try:
        schema = ServeDeploySchema.model_validate(data)
    except ValidationError as e:
        raise ServeConfigError(
            [
                f"`{'.'.join(str(p) for p in err['loc'])}`: {err['msg']} (ServeDeploySchema)"
                for err in e.errors()
            ]
        ) from None
    problems = unknown_keys(ServeDeploySchema, data, "")
    for i, app in enumerate(data.get("applications") or []):
        if app.get("import_path") != OUTRIDER_IMPORT_PATH:
            continue
        where = f"applications[{i}]"
        try:
            load_config(None, app.get("args") or {})
        except ConfigError as e:
            problems.append(f"{where}.args: {e}")
        for j, dep in enumerate(app.get("deployments") or []):
            if dep.get("name") not in OUTRIDER_DEPLOYMENTS:
                problems.append(
                    f"{where}.deployments[{j}].name: {dep.get('name')!r} is not a deployment of "
                    f"{OUTRIDER_IMPORT_PATH} (it has: {', '.join(OUTRIDER_DEPLOYMENTS)})"
                )
    if problems:
        raise ServeConfigError(problems)
    return schema


def serve_configs(text: str) -> list[tuple[str, Any]]:
    """(label, Serve config) pairs in a YAML text: the document itself, or RayServices'."""
    found: list[tuple[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "RayService":
            name = (doc.get("metadata") or {}).get("name", "?")
            raw = (doc.get("spec") or {}).get("serveConfigV2")
            if not isinstance(raw, str):
                raise ServeConfigError([f"RayService {name}: spec.serveConfigV2 is not a string"])
            found.append((f"RayService {name} serveConfigV2", yaml.safe_load(raw)))
        elif "applications" in doc:
            found.append(("", doc))
    return found


def check_serve_config_file(path: str | Path) -> list[Any]:
    """Check every Serve config in a file (``-``: stdin); returns their ServeDeploySchemas."""
    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    configs = serve_configs(text)
    if not configs:
        raise ServeConfigError(["no Serve config (`applications`) or RayService found"])
    out = []
    for label, config in configs:
        try:
            out.append(check_serve_config(config))
        except ServeConfigError as e:
            if not label:
                raise
            raise ServeConfigError([f"{label}: {p}" for p in e.problems]) from None
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: check_serve_config.py SERVE_CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        check_serve_config_file(args[0])
    except (OSError, yaml.YAMLError) as e:
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 1
    except ServeConfigError as e:
        for problem in e.problems:
            print(f"{args[0]}: {problem}", file=sys.stderr)
        return 1
    print(f"{args[0]}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
