"""Writes the policy's Triton model repository from its settings, then exits.

    RLHF_POLICY_MODEL_REPOSITORY=/model-repository python -m services.policy repository

Kubernetes runs it as the init container of each policy pod (helm/: the Triton sidecar then starts
with `--load-model=policy`); local runs and tests let the service write and load the model itself.
"""

from __future__ import annotations


from services.common.repository_command import run
from services.policy.settings import PolicySettings


def main() -> int:
    from services.policy.server import write_triton_model

    return run(PolicySettings, write_triton_model)
