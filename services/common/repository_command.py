"""The body of `python -m services.<svc> repository`: write a model service's Triton model
repository from its settings and exit (the Helm chart's init container runs it)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def run(settings_type: type, write: Callable[[object], Path]) -> int:
    settings = settings_type()
    if getattr(settings, "model_repository", None) is None:
        prefix = settings_type.model_config.get("env_prefix", "")
        print(f"{prefix}MODEL_REPOSITORY is not set", file=sys.stderr)
        return 2
    print(write(settings))
    return 0
