"""The JSON Schema of the policy file, generated from the pydantic models in `config.py`."""

from __future__ import annotations

import json
from typing import Any

from .config import Settings

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def config_schema() -> dict[str, Any]:
    """`Settings` as a draft 2020-12 JSON Schema (unknown keys are errors: additionalProperties false).

    Cross-field rules (a route's pool must exist, thresholds must rise, ...) are checked by
    `gpu-supervisor check-config`, not by the schema; the schema is for editors and CI linters.
    """
    schema = Settings.model_json_schema(mode="validation")
    return {"$schema": DRAFT, "title": "gpu-supervisor policy", **{k: v for k, v in schema.items() if k != "title"}}


def render() -> str:
    return json.dumps(config_schema(), indent=2) + "\n"


__all__ = ["config_schema", "render", "DRAFT"]
