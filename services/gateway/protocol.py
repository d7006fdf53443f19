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
    idempotency_key: str | None = Field(None, min_length=1, max_length=128, pattern=ID_PATTERN)

    @field_validator("responses")
    @classmethod
    def _distinct_responses(cls, responses: list[str]) -> list[str]:
        if len(set(responses)) != len(responses):
            raise ValueError("the ranked responses must be distinct")
        return responses


class Accepted(BaseModel):
    id: str = Field(description="Feedback id (or preference/ranking id) of the stored event.")
    status: Literal["accepted"] = "accepted"
    duplicate: bool = Field(description="True when this idempotency key was already stored.")
    records: int = Field(description="Kafka records written for this event.")
