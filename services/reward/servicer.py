"""gRPC RewardService: checks and converts messages, calls RewardScorer, records metrics.

Bad input is INVALID_ARGUMENT naming the field (`pairs[2].prompt: empty prompt`); a refused
reload is an OK response with `accepted=false` and the reason (the request itself was valid).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import BATCH_BUCKETS
from services.common.prompts import checked_prompt_text
from services.common.rpc import FieldError, Forbidden, abort_for, remaining_s
from services.genproto.rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.reward.scorer import RewardScorer, ScoredBatch
from services.reward.settings import RewardSettings

log = logging.getLogger(__name__)
SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


class RewardMetrics:
    """rlhf_reward_*: pairs per request, pairs per Triton forward pass, served version, reloads."""

    def __init__(self, registry: CollectorRegistry):
        self.request_pairs = Histogram(
            "rlhf_reward_request_pairs",
            "Pairs per Score request.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.model_batch_size = Histogram(
            "rlhf_reward_model_batch_size",
            "Pairs in the Triton forward pass that served a request chunk.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.model_version = Gauge(
            "rlhf_reward_model_version",
            "Reward-model version last seen serving.",
            registry=registry,
        )
        self.reloads = Counter(
            "rlhf_reward_reloads_total", "Reload orders, by result.", ["result"], registry=registry
        )


def checked_pairs(
    request: reward_pb2.ScoreRequest, settings: RewardSettings
) -> tuple[list[str], list[str]]:
    """(prompt texts, responses) of a valid request; FieldError names the first bad field."""
    if request.model not in ("", settings.model_name):
        raise FieldError(
            "model", f"unknown model {request.model!r}; this service serves {settings.model_name!r}"
        )
    if not request.pairs:
        raise FieldError("pairs", "empty batch: send at least one (prompt, response) pair")
    if len(request.pairs) > settings.max_pairs:
        raise FieldError(
            "pairs", f"{len(request.pairs)} pairs exceed the limit of {settings.max_pairs}"
        )
    prompts, responses = [], []
    for i, pair in enumerate(request.pairs):
        where = f"pairs[{i}]"
        prompt = checked_prompt_text(pair.prompt, where)
        if not prompt.strip():
            raise FieldError(f"{where}.prompt", "empty prompt")
        if len(prompt) > settings.max_text_chars:
            raise FieldError(
                f"{where}.prompt",
                f"{len(prompt)} characters exceed the limit of {settings.max_text_chars}",
            )
        if len(pair.response) > settings.max_text_chars:
            raise FieldError(
                f"{where}.response",
                f"{len(pair.response)} characters exceed the limit of {settings.max_text_chars}",
            )
        prompts.append(prompt)
        responses.append(pair.response)
    return prompts, responses


def reload_root(settings: RewardSettings) -> Path | None:
    """The folder ReloadModel may load versions from: `reload_root`, else `versions_root`."""
    return settings.reload_root or settings.versions_root


def checked_reload(request: reward_pb2.ReloadModelRequest, root: Path | None) -> None:
    if request.reward_model_version == 0:
        raise FieldError("reward_model_version", "must be a version number >= 1")
    if not request.path.startswith("/"):
        raise FieldError("path", f"must be an absolute folder path, got {request.path!r}")
    if not request.file_sha256:
        raise FieldError(
            "file_sha256", "empty manifest: list the sha256 of every file in the folder"
        )
    for name, digest in request.file_sha256.items():
        if not SHA256_HEX.match(digest):
            raise FieldError(f"file_sha256[{name!r}]", "not a hex sha256 digest")
    if root is None:
        raise Forbidden("ReloadModel is off: set versions_root (or reload_root) to allow it")
    # Resolved, so that neither `..` nor a symlink leads out of the root.
    folder, base = Path(request.path).resolve(), root.resolve()
    if folder == base or not folder.is_relative_to(base):
        raise Forbidden(f"path: only version folders under {base} may be loaded")


def score_response(scored: ScoredBatch) -> reward_pb2.ScoreResponse:
    """Mean scores and spreads per pair; every member's score, pair-major, when there are several
    heads (pair i, member j at i * ensemble_size + j)."""
    ensemble_size = int(scored.members.shape[1])
    return reward_pb2.ScoreResponse(
        scores=scored.scores.tolist(),
        spreads=scored.spreads.tolist(),
        ensemble_size=ensemble_size,
        member_scores=scored.members.reshape(-1).tolist() if ensemble_size > 1 else [],
        reward_model_version=scored.version,
    )


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, settings: RewardSettings, scorer: RewardScorer, metrics: RewardMetrics):
        self.settings = settings
        self.scorer = scorer
        self.metrics = metrics
        metrics.model_version.set(settings.model_version)

    def Score(
        self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        try:
            prompts, responses = checked_pairs(request, self.settings)
            self.metrics.request_pairs.observe(len(prompts))
            scored = self.scorer.score(
                prompts, responses, remaining_s(context, self.settings.triton.timeout_s)
            )
        except Exception as error:  # noqa: BLE001 - abort_for re-raises what it does not map
            abort_for(context, error, "reward")
        for size in scored.model_batch_sizes:
            self.metrics.model_batch_size.observe(size)
        self.metrics.model_version.set(scored.version)
        return score_response(scored)

    def ReloadModel(
        self, request: reward_pb2.ReloadModelRequest, context: grpc.ServicerContext
    ) -> reward_pb2.ReloadModelResponse:
        try:
            checked_reload(request, reload_root(self.settings))
            result = self.scorer.reload(
                request.reward_model_version,
                request.path,
                dict(request.file_sha256),
                remaining_s(context, 600.0),
            )
        except Exception as error:  # noqa: BLE001
            abort_for(context, error, "reward")
        self.metrics.reloads.labels("accepted" if result.accepted else "refused").inc()
        self.metrics.model_version.set(result.version)
        log.info(
            "reload",
            extra={
                "fields": {
                    "requested": request.reward_model_version,
                    "accepted": result.accepted,
                    "serving": result.version,
                    "reason": result.reason,
                }
            },
        )
        return reward_pb2.ReloadModelResponse(
            accepted=result.accepted, reward_model_version=result.version, reason=result.reason
        )
