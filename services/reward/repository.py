"""Writes the reward's Triton model repository from its settings, then exits.

    RLHF_REWARD_MODEL_REPOSITORY=/model-repository python -m services.reward repository

Kubernetes runs it as the init container of each reward pod (helm/: the Triton sidecar then starts
with `--load-model=reward`); local runs and tests let the service write and load the model itself.
"""

from __future__ import annotations


from services.common.repository_command import run
from services.reward.settings import RewardSettings


def main() -> int:
    from services.reward.server import write_triton_model

    return run(RewardSettings, write_triton_model)
