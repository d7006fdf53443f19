"""Settings of the judge service, from the environment (prefix `RLHF_JUDGE_`; the scheme every
model service shares: services.common.settings.ModelServiceSettings).

RLHF_JUDGE_MODEL_DIR=/models/policy/v1            # an instruct model; default: the policy's
RLHF_JUDGE_RUBRIC_FILE=services/judge/constitutions/v1.yaml    # a rubric or a constitution
RLHF_JUDGE_ANNOTATOR=services.common.annotator_rules:polite    # rule-based: no model, no Triton
RLHF_JUDGE_POLICY_ADDRESS=policy:50051             # judge through a running PolicyService
RLHF_JUDGE_PUBLISH=true                            # every verdict to rlhf.preferences.v1
RLHF_JUDGE_GRPC_PORT=50054 RLHF_JUDGE_GRPC_METRICS_PORT=9104
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import KafkaSettings, ModelServiceSettings
from services.judge.rubric import DEFAULT_RUBRIC

DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"


def policy_model_dir() -> Path:
    """The policy's model folder (RLHF_POLICY_MODEL_DIR), else the local instruct model."""
    return Path(os.environ.get("RLHF_POLICY_MODEL_DIR", DEFAULT_MODEL_DIR))


class JudgeSettings(ModelServiceSettings):
    """Everything the judge service needs to run."""

    model_config = SettingsConfigDict(env_prefix="RLHF_JUDGE_")
    default_ports = (50054, 9104)

    model_dir: Path = Field(
        default_factory=policy_model_dir,
        description="Instruct model folder the judge runs (default: the policy's, "
        "RLHF_POLICY_MODEL_DIR).",
    )
    triton_model: str = Field("judge", description="Name of the model inside Triton.")
    judge_name: str = Field(
        "", description="The judge model's name in verdicts and AI labels; '' = the folder name."
    )
    rubric_file: Path = Field(
        DEFAULT_RUBRIC,
        description="Rubric (version, rubric) or constitution (version, principles) YAML file.",
    )
    annotator: str = Field(
        "",
        description="Rule-based judge, `module:function` scoring (prompt, answer) "
        "(services/common/annotator.py); set, no model is loaded and Triton is not used.",
    )
    policy_address: str = Field(
        "",
        description="host:port of a running PolicyService to judge through (its model in "
        "Triton) instead of a judge model of our own; `model_dir` then only gives the tokenizer.",
    )
    publish: bool = Field(
        False, description="Publish every verdict that is not a tie, whatever the request says."
    )
    publish_min_confidence: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Verdicts are published only when their confidence is above this (a tie, "
        "confidence 0, never is).",
    )
    annotation_max_confidence: float = Field(
        -1.0,
        lt=1.0,
        description="Pairs the judge is this unsure of or less (confidence <= it) go to the "
        "annotation queue (rlhf.annotation-queue.v1, reason judge) for people to rank, on "
        "calls that publish; negative: off. 0.2 is a start.",
    )
    max_pairs: int = Field(64, ge=1, description="Pairs one Compare request may hold.")
    max_text_chars: int = Field(
        8_000, ge=1, description="Characters a rendered prompt or an answer may hold."
    )
    max_length: int = Field(
        2048, ge=16, description="Tokens a judge prompt (rubric, question, both answers) may hold."
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Where to publish.")

    @property
    def mode(self) -> str:
        """`rules` with an annotator, `policy` with a policy address, else `model`."""
        if self.annotator:
            return "rules"
        return "policy" if self.policy_address else "model"

    @property
    def judge_model(self) -> str:
        """What verdicts name as the judge."""
        if self.annotator:
            return self.annotator
        return self.judge_name or Path(self.model_dir).resolve().name
