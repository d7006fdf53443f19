"""Settings of the reward service, from the environment (prefix `RLHF_REWARD_`; the scheme every
model service shares: services.common.settings.ModelServiceSettings).

RLHF_REWARD_MODEL_DIR=/models/reward/v7 RLHF_REWARD_MODEL_VERSION=7
RLHF_REWARD_GRPC_PORT=50052 RLHF_REWARD_GRPC_METRICS_PORT=9102   # the gRPC block
RLHF_TRITON_URL=triton:8001                                        # shared Triton block
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ModelServiceSettings


class RewardSettings(ModelServiceSettings):
    """Everything the reward service needs to run."""

    model_config = SettingsConfigDict(env_prefix="RLHF_REWARD_")
    default_ports = (50052, 9102)

    model_version: int = Field(1, ge=1, description="Version number of the folder served at start.")
    model_name: str = Field(
        "reward", description="Model name clients may put in requests ('' also accepted)."
    )
    triton_model: str = Field("reward", description="Name of the model inside Triton.")
    max_length: int = Field(
        512, ge=8, description="Tokens per (prompt, response) pair; must equal the trainer's."
    )
    max_pairs: int = Field(256, ge=1, description="Pairs one Score request may hold.")
    max_text_chars: int = Field(
        32_000, ge=1, description="Characters a rendered prompt or a response may hold."
    )
    versions_root: Path | None = Field(
        None,
        description="Folder of published versions (the refresh's, on a shared volume): the service "
        "serves the version its CURRENT file names, at start and whenever it changes.",
    )
    reload_root: Path | None = Field(
        None,
        description="Folder ReloadModel may load version folders from (resolved: no `..` or "
        "symlink out of it); unset: versions_root; with neither, ReloadModel is refused.",
    )
    follow_interval_s: float = Field(
        10.0, gt=0, description="How often the service re-reads versions_root/CURRENT."
    )
    model_dir: Path | None = Field(
        None,
        description="Hugging Face folder of the reward model served at start (required unless "
        "`annotator` is set).",
    )
    annotator: str = Field(
        "",
        description="A rule reward, `module:function` scoring (prompt, response) "
        "(services/common/annotator.py): verifiable rewards (a test passes, an answer matches), "
        "or a benchmark's in-process rule. Set, no model is loaded, Triton is not used, "
        "ReloadModel is refused, and every score names version `model_version`.",
    )

    @model_validator(mode="after")
    def _a_model_or_a_rule(self) -> RewardSettings:
        if self.model_dir is None and not self.annotator:
            raise ValueError("set RLHF_REWARD_MODEL_DIR (a reward model) or RLHF_REWARD_ANNOTATOR")
        return self
