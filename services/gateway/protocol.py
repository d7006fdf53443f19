"""Wire schemas of the gateway's own HTTP API: feedback, preferences, rankings (pydantic, strict).

Every request model forbids unknown fields and bounds every length and count, so bad input is a
422 whose `detail[].loc` names the field. The OpenAI-compatible schemas are in `openai_protocol`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_TEXT = 32_000
"""Characters in one prompt, message or response."""

ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
Category = Annotated[str, Field(min_length=1, max_length=64)]
Cohort = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=64,
        pattern=ID_PATTERN,
        description="The annotator cohort of the person judging (a locale, a customer tier, a "
        "labelling vendor: 1-64 of A-Z a-z 0-9 _ . : -); the reward trainer reports agreement "
        "and accuracy per cohort.",
    ),
]
CandidateId = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=128,
        pattern=ID_PATTERN,
        description="The `candidate_id` of the GET /v1/annotation-queue entry this answers: "
        "the records' `derived_from` names it, and it leaves the queue.",
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# ----- feedback -----


class FeedbackRequest(Strict):
    response_id: str = Field(
        min_length=1,
        max_length=128,
        pattern=ID_PATTERN,
        description="The `id` a chat completion returned.",
    )
    thumb: Literal["up", "down"] | None = Field(None, description="Thumbs up or down.")
    rating: int | None = Field(
        None, ge=1, le=5, validate_default=True, description="A 1-5 rating instead of a thumb."
    )
    comment: str | None = Field(None, max_length=4000, description="Free text.")
    categories: list[Category] = Field(
        default_factory=list,
        max_length=16,
        description="Tags such as `helpful`, `unsafe` (each 1-64 chars).",
    )
    user_id: str | None = Field(None, max_length=128, description="The product's user id.")
    cohort: Cohort = None
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=ID_PATTERN,
        description="The same key twice is stored once; retry with the same key after a 503.",
    )

    @field_validator("rating")
    @classmethod
    def _one_judgement(cls, rating: int | None, info: ValidationInfo) -> int | None:
        if "thumb" not in info.data:
            return rating  # `thumb` itself failed; its own error names it
        if (info.data["thumb"] is None) == (rating is None):
            raise ValueError("give exactly one of `thumb` or `rating`")
        return rating


class PreferenceRequest(Strict):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT, description="The prompt both answer.")
    chosen: str = Field(min_length=1, max_length=MAX_TEXT, description="The better response.")
    rejected: str = Field(min_length=1, max_length=MAX_TEXT, description="The worse response.")
    cohort: Cohort = None
    candidate_id: CandidateId = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=128, pattern=ID_PATTERN)

    @field_validator("rejected")
    @classmethod
    def _distinct(cls, rejected: str, info: ValidationInfo) -> str:
        if rejected == info.data.get("chosen"):
            raise ValueError("must differ from `chosen`")
        return rejected


class RankingRequest(Strict):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT, description="The prompt all answer.")
    responses: list[Text] = Field(
        min_length=2, max_length=16, description="K responses ranked best first (2 <= K <= 16)."
    )
    cohort: Cohort = None
    candidate_id: CandidateId = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=128, pattern=ID_PATTERN)

    @field_validator("responses")
    @classmethod
    def _distinct_responses(cls, responses: list[str]) -> list[str]:
        if len(set(responses)) != len(responses):
            raise ValueError("the ranked responses must be distinct")
        return responses


class QueuedCandidate(BaseModel):
    """One AnnotationCandidate (protos/rlhf/v1/events.proto) as GET /v1/annotation-queue gives
    it: rank its `responses` with POST /v1/rankings, passing `prompt` and `candidate_id`."""

    candidate_id: str
    prompt: str = Field(description="The prompt as text, as the reward model scored it.")
    responses: list[str]
    response_ids: list[str] = Field(description="One per response when known, else empty.")
    disagreement: float = Field(
        description="How unsure the reward model's ensemble is about their order (higher first)."
    )
    reason: str = Field(description="`ensemble` or `judge`: who was unsure.")
    reward_model_version: int


class AnnotationQueueResponse(BaseModel):
    candidates: list[QueuedCandidate] = Field(description="Highest disagreement first.")
    queued: int = Field(description="Candidates this replica holds in all.")


class Accepted(BaseModel):
    id: str = Field(description="Feedback id (or preference/ranking id) of the stored event.")
    status: Literal["accepted"] = "accepted"
    duplicate: bool = Field(description="True when this idempotency key was already stored.")
    records: int = Field(description="Kafka records written for this event.")
