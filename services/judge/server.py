"""The judge service: gRPC `rlhf.v1.JudgeService`, which of two answers is better by a rubric or
a constitution (RLAIF, Constitutional AI).

Start here. Compare takes a batch of (prompt, answer A, answer B) and gives, per pair, P(A better)
and a confidence, with the judge model and the rubric version:
1. each pair is asked in both orders, (A, B) and (B, A) (services.judge.judges.compare);
2. the model judge reads the verdict from an instruct model's next-token probabilities of the
   letters "A" and "B", computed inside Triton (services.judge.triton_model), or asked of a
   running PolicyService (RLHF_JUDGE_POLICY_ADDRESS; one token, both letters biased so both are
   returned); the rule-based judge (RLHF_JUDGE_ANNOTATOR=module:function) scores both answers
   instead, with no model;
3. the two orders are combined to cancel position bias (services.judge.rubric.combine);
4. with `publish` (the request's or the setting), every verdict that is not a tie becomes a
   PreferenceRecord with source AI on rlhf.preferences.v1, acknowledged before the response
   (services.judge.labels).

    python -m services.judge               # settings from RLHF_JUDGE_* (services.judge.settings)
    python -m services.judge repository    # write the Triton model repository and exit
    python -m services.cli judge           # the same service from the `rlhf` command line

The lifecycle is the one every model service shares (services/common/model_service.py); a
rule-based judge, or one through a PolicyService, skips what concerns Triton (no model of its
own written, loaded or watched).

Files: settings.py, rubric.py (rubric, constitution, judge prompt, order combination),
triton_model.py (the model inside Triton), judges.py (logic), labels.py (AI preference records),
servicer.py (gRPC), cai.py (`rlhf cai-sft`), label_file.py (`rlhf label-ai`).
"""

from __future__ import annotations

from typing import Self

from prometheus_client import CollectorRegistry

from services.common.model_service import ModelService, python_model_spec
from services.common.triton_repo import PythonModelSpec
from services.genproto.rlhf.v1 import judge_pb2_grpc
from services.judge.judges import make_judge
from services.judge.labels import LabelPublisher
from services.judge.servicer import JudgeMetrics, JudgeServicer
from services.judge.settings import JudgeSettings
from services.judge.triton_model import INPUTS, OUTPUTS


class JudgeService(ModelService):
    """The judge (`judge`: the model's Triton client, or the rule) behind the JudgeService."""

    name = "judge"
    settings_type = JudgeSettings

    @classmethod
    def triton_spec(cls, settings: JudgeSettings) -> PythonModelSpec:
        return python_model_spec(
            settings,
            "services.judge.triton_model:JudgeTritonModel",
            INPUTS,
            OUTPUTS,
            max_length=settings.max_length,
        )

    def __init__(self, settings: JudgeSettings, registry: CollectorRegistry | None = None):
        super().__init__(settings, registry)
        self.judge = make_judge(settings)
        self.publisher = LabelPublisher(settings.kafka)
        servicer = JudgeServicer(
            settings, self.judge, self.publisher, JudgeMetrics(self.server.registry)
        )
        self.servicer = servicer
        self.server.add(
            judge_pb2_grpc.add_JudgeServiceServicer_to_server, servicer, "rlhf.v1.JudgeService"
        )

    @classmethod
    def launch(cls, settings: JudgeSettings, registry: CollectorRegistry | None = None) -> Self:
        if settings.mode == "model":
            return super().launch(settings, registry)
        service = cls(settings, registry)  # rules, policy: no Triton model of its own
        service.start()
        return service

    def start(self) -> int:
        if self.settings.mode == "model":
            return super().start()
        return self.server.start()

    def close(self) -> None:
        self.publisher.close()
        self.judge.close()
