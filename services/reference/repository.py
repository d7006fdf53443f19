"""Writes the reference's Triton model repository from its settings, then exits.

    RLHF_REFERENCE_MODEL_REPOSITORY=/model-repository python -m services.reference repository

Kubernetes runs it as the init container of each reference pod (helm/: the Triton sidecar then starts
with `--load-model=reference`); local runs and tests let the service write and load the model itself.
"""

from __future__ import annotations


from services.common.repository_command import run
from services.reference.settings import ReferenceSettings


def main() -> int:
    from services.reference.server import write_triton_model

    return run(ReferenceSettings, write_triton_model)
