"""The reward service: gRPC `rlhf.v1.RewardService` in front of the Triton model `reward`.

Start here. Score turns a batch of (prompt, response) pairs into one scalar each, computed inside
Triton (services.reward.triton_model) and named with the reward-model version that produced it
(or, with RLHF_REWARD_ANNOTATOR=module:function, by a rule in-process: no model, no Triton);
ReloadModel swaps in a newly published version after checking its checksums and tensor shapes;
with RLHF_REWARD_VERSIONS_ROOT set, the service also serves what that folder's CURRENT names, at
start and whenever it changes (a reload it missed while restarting: services.reward.follower).

    python -m services.reward        # settings from RLHF_REWARD_* (services.reward.settings)

With RLHF_REWARD_MODEL_REPOSITORY set, the service writes its Triton model there and asks Triton
(explicit model control) to load it; otherwise the deployment loads it. The lifecycle is the one
every model service shares: services/common/model_service.py.

Files: settings.py (configuration), encoding.py (what the model reads), checkpoint.py (reload
checks), triton_model.py (the model inside Triton), scorer.py (logic), servicer.py (gRPC).
"""

from __future__ import annotations

from typing import Self

from prometheus_client import CollectorRegistry

from services.common.model_service import ModelService, python_model_spec
from services.common.triton_repo import PythonModelSpec
from services.genproto.rlhf.v1 import reward_pb2_grpc
from services.reward.follower import PublishedFollower
from services.reward.scorer import RewardScorer, RuleScorer
from services.reward.servicer import RewardMetrics, RewardServicer
from services.reward.settings import RewardSettings
from services.reward.triton_model import INPUTS, OUTPUTS


class RewardService(ModelService):
    """The reward model's Triton client (`scorer`) behind the RewardService, and the follower
    of published versions when `versions_root` is set."""

    name = "reward"
    settings_type = RewardSettings
    control_methods = ("/rlhf.v1.RewardService/ReloadModel",)

    @classmethod
    def triton_spec(cls, settings: RewardSettings) -> PythonModelSpec:
        return python_model_spec(
            settings,
            "services.reward.triton_model:RewardTritonModel",
            INPUTS,
            OUTPUTS,
            version=settings.model_version,
            max_length=settings.max_length,
        )

    def __init__(self, settings: RewardSettings, registry: CollectorRegistry | None = None):
        if settings.annotator and settings.versions_root is not None:
            raise ValueError(
                "RLHF_REWARD_ANNOTATOR and RLHF_REWARD_VERSIONS_ROOT: a rule reward has no model "
                "versions to follow; set one of them"
            )
        super().__init__(settings, registry)
        self.scorer = RuleScorer(settings) if settings.annotator else RewardScorer(settings)
        servicer = RewardServicer(settings, self.scorer, RewardMetrics(self.server.registry))
        self.server.add(
            reward_pb2_grpc.add_RewardServiceServicer_to_server, servicer, "rlhf.v1.RewardService"
        )
        self.follower: PublishedFollower | None = None
        if settings.versions_root is not None:
            # The published version is served before the service takes traffic.
            self.follower = PublishedFollower(
                settings.versions_root,
                self.scorer,
                settings.model_version,
                settings.follow_interval_s,
            )
            self.follower.sync()
            self.follower.start()

    @classmethod
    def launch(cls, settings: RewardSettings, registry: CollectorRegistry | None = None) -> Self:
        if not settings.annotator:
            return super().launch(settings, registry)
        service = cls(settings, registry)  # a rule: no Triton model of its own
        service.start()
        return service

    def start(self) -> int:
        if not self.settings.annotator:
            return super().start()
        return self.server.start()  # nothing in Triton to watch

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.scorer.close()
