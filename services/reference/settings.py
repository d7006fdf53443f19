"""Settings of the reference service, from the environment (prefix `RLHF_REFERENCE_`; the scheme
every model service shares: services.common.settings.ModelServiceSettings).

RLHF_REFERENCE_MODEL_DIR=/models/smollm2-135m-instruct
RLHF_REFERENCE_GRPC_PORT=50053 RLHF_REFERENCE_GRPC_METRICS_PORT=9103   # the gRPC block
RLHF_TRITON_URL=triton:8001                                             # shared Triton block
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ModelServiceSettings


class ReferenceSettings(ModelServiceSettings):
    """Everything the reference service needs to run (model_dir: the frozen reference causal LM)."""

    model_config = SettingsConfigDict(env_prefix="RLHF_REFERENCE_")
    default_ports = (50053, 9103)

    model_version: int = Field(
        1, ge=1, description="Version reported by the version gauge (frozen model)."
    )
    model_name: str = Field(
        "reference", description="Model name clients may put in requests ('' also accepted)."
    )
    triton_model: str = Field("reference", description="Name of the model inside Triton.")
    max_sequences: int = Field(
        256, ge=1, description="Sequences one ComputeLogprobs request may hold."
    )
    max_total_tokens: int | None = Field(
        None,
        ge=2,
        description="Prompt + response tokens per sequence; default: the model's max positions.",
    )
    triton_max_batch_size: int = Field(
        16, ge=1, description="Sequences the Triton dynamic batcher runs at once."
    )
