"""Writes the policy's Triton model repository from its settings, then exits.

    RLHF_POLICY_MODEL_REPOSITORY=/model-repository python -m services.policy.repository

Kubernetes runs it as the init container of each policy pod (helm/: the Triton sidecar then starts
with `--load-model=policy`); local runs and tests let the service write and load the model itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.policy.settings import PolicySettings


def main() -> int:
    settings = PolicySettings()
    if settings.model_repository is None:
        print("RLHF_POLICY_MODEL_REPOSITORY is not set", file=sys.stderr)
        return 2
    from services.policy.server import write_triton_model

    print(write_triton_model(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
