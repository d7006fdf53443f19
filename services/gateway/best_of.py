"""Best-of-N for products: chat completions with `best_of` (an extension of this gateway; OpenAI
has it on legacy completions only) are ranked by the reward model before they are answered.

    1. the policy samples `best_of` answers to the chat (one Generate call, n = best_of);
    2. the reward service scores every (chat, answer) pair in one Score call;
    3. the `n` answers of highest reward are the choices, best first, each with its `reward`;
       the answer names the `reward_model_version` that ranked them.

Usage counts every sampled token (all `best_of` answers were generated), as OpenAI bills
`best_of`. The reward service is reached like the policy (`services/common/channels.py`: every
replica, round robin, TLS when RLHF_GRPC_CLIENT_TLS_* say so); without one configured
(RLHF_GATEWAY_REWARD_URL), `best_of` is a 400.
"""

from __future__ import annotations

import grpc

from services.common.channels import replica_aio_channel
from services.gateway.openai_errors import OpenAIError
from services.gateway.openai_protocol import ChatCompletionRequest
from services.gateway.serving import GRPC_TO_HTTP
from services.genproto.rlhf.v1 import common_pb2, policy_pb2, reward_pb2, reward_pb2_grpc


class RewardClient:
    """One grpc.aio channel to every RewardService replica behind `url`."""

    def __init__(self, url: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.channel = replica_aio_channel(url, ["rlhf.v1.RewardService"])
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    async def score(
        self, prompt: common_pb2.Prompt, responses: list[str]
    ) -> reward_pb2.ScoreResponse:
        """2. One score per response to `prompt`, in order; a gRPC error is an OpenAI error."""
        request = reward_pb2.ScoreRequest(
            pairs=[reward_pb2.ScoredPair(prompt=prompt, response=r) for r in responses]
        )
        try:
            reply = await self.stub.Score(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise reward_error(error) from error
        if len(reply.scores) != len(responses):
            raise OpenAIError(
                502, f"reward service returned {len(reply.scores)} scores for {len(responses)}"
            )
        return reply

    async def close(self) -> None:
        await self.channel.close()


def reward_error(error: grpc.aio.AioRpcError) -> OpenAIError:
    """The reward service's failure as the gateway's: the request was the policy's output, so
    a refusal is the server's fault (502), not the caller's."""
    status = GRPC_TO_HTTP.get(error.code(), 502)
    status = 502 if status in (400, 404) else status
    headers = {"Retry-After": "1"} if status == 503 else None
    return OpenAIError(
        status, f"reward: {error.code().name}: {error.details() or ''}", headers=headers
    )


def samples_to_draw(request: ChatCompletionRequest) -> int:
    """1. How many answers the policy samples: `best_of`, else `n`."""
    return request.best_of or request.n or 1


def check_best_of(request: ChatCompletionRequest, reward: RewardClient | None) -> None:
    """`best_of` needs a reward service to rank by (400 naming `best_of` otherwise)."""
    if request.best_of is not None and reward is None:
        raise OpenAIError(
            400,
            "`best_of` needs a reward model to rank the samples, and this gateway has none "
            "configured (RLHF_GATEWAY_REWARD_URL)",
            "best_of",
            code="unsupported_parameter",
        )


async def rank(
    reward: RewardClient,
    prompt: common_pb2.Prompt,
    samples: list[policy_pb2.Sample],
    n: int,
) -> tuple[list[tuple[policy_pb2.Sample, float]], int]:
    """2-3. The `n` samples of highest reward, best first (ties keep the policy's order), with
    their rewards; and the reward-model version that scored them."""
    scored = await reward.score(prompt, [s.text for s in samples])
    order = sorted(range(len(samples)), key=lambda i: -scored.scores[i])[:n]
    return [(samples[i], scored.scores[i]) for i in order], scored.reward_model_version
