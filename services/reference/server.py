"""The reference service: gRPC `rlhf.v1.ReferenceService` in front of the Triton model `reference`.

Start here. ComputeLogprobs returns, for each (prompt tokens, response tokens), the log-prob of
every response token under the frozen reference model (the KL anchor of RL training), computed
inside Triton (services.reference.triton_model) with whatever concurrent requests the dynamic
batcher groups run as one forward pass.

    python -m services.reference     # settings from RLHF_REFERENCE_* (services.reference.settings)

With RLHF_REFERENCE_MODEL_REPOSITORY set, the service writes its Triton model there and asks
Triton (explicit model control) to load it; otherwise the deployment loads it. The lifecycle is
the one every model service shares: services/common/model_service.py.

Files: settings.py (configuration), logprobs.py (the math), triton_model.py (the model inside
Triton), scorer.py (logic), servicer.py (gRPC).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.common.model_service import ModelService, python_model_spec
from services.common.triton_repo import PythonModelSpec
from services.genproto.rlhf.v1 import reference_pb2_grpc
from services.reference.scorer import ReferenceScorer, model_limits
from services.reference.servicer import ReferenceMetrics, ReferenceServicer
from services.reference.settings import ReferenceSettings
from services.reference.triton_model import INPUTS, OUTPUTS


class ReferenceService(ModelService):
    """The reference model's Triton client (`scorer`) behind the ReferenceService."""

    name = "reference"
    settings_type = ReferenceSettings

    @classmethod
    def triton_spec(cls, settings: ReferenceSettings) -> PythonModelSpec:
        return python_model_spec(
            settings, "services.reference.triton_model:ReferenceTritonModel", INPUTS, OUTPUTS
        )

    def __init__(self, settings: ReferenceSettings, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry)
        self.scorer = ReferenceScorer(settings)
        servicer = ReferenceServicer(
            settings,
            model_limits(settings.model_dir),
            self.scorer,
            ReferenceMetrics(self.server.registry),
        )
        self.server.add(
            reference_pb2_grpc.add_ReferenceServiceServicer_to_server,
            servicer,
            "rlhf.v1.ReferenceService",
        )

    def close(self) -> None:
        self.scorer.close()
