"""Typed Serve application builder: ``import_path: outrider.cluster.app:app_builder``.

The args are outrider's one config schema (the same mapping ``outrider serve --config`` reads),
validated by ``load_config`` so that an unknown key is an error that names it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from outrider.cluster.config import OutriderConfig, load_config


class OutriderArgs(BaseModel):
    """Serve passes the application's ``args`` here; every key is checked by outrider."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _check(self) -> OutriderArgs:
        load_config(None, self.as_config_dict())
        return self

    def as_config_dict(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def to_config(self) -> OutriderConfig:
        return load_config(None, self.as_config_dict())


def app_builder(args: OutriderArgs | dict[str, Any]) -> Any:
    from outrider.cluster.router import build_router_deployment

    # NOTE: Serve sees this annotation as a string (postponed annotations) and passes a dict.
    if not isinstance(args, OutriderArgs):
        args = OutriderArgs.model_validate(args)
    return build_router_deployment(args.to_config())
