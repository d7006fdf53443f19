"""A stand-in for the policy's gRPC client, for the gateway's unit tests: it records the
requests it gets and answers with samples whose tokens, texts and log-probs are predictable
(the real policy is in tests/integration/gateway)."""

from __future__ import annotations

import grpc

from services.gateway.serving import PolicyClient
from services.genproto.rlhf.v1 import common_pb2, policy_pb2

SERVED = "tiny-policy"
TOKENS = [11, 12, 13]
TEXTS = {11: "Hel", 12: "lo", 13: "!"}


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def positions(sampling: policy_pb2.SamplingParams, j: int) -> list[policy_pb2.PositionLogprobs]:
    if not (sampling.token_logprobs or sampling.top_logprobs):
        return []
    out = []
    for t in TOKENS:
        top = [(t, -0.25 - j), (99, -2.0)][: sampling.top_logprobs]
        out.append(
            policy_pb2.PositionLogprobs(
                sampled=policy_pb2.TokenLogprob(token_id=t, text=TEXTS[t], logprob=-0.25 - j),
                top=[
                    policy_pb2.TokenLogprob(token_id=a, text=TEXTS.get(a, "?"), logprob=v)
                    for a, v in top
                ],
            )
        )
    return out


class FakeCall:
    """A GenerateStream call: its chunks, then EOF (or `error` after them)."""

    def __init__(self, chunks, error=None):
        self.chunks, self.error, self.cancelled = list(chunks), error, False

    async def read(self):
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        return grpc.aio.EOF

    def cancel(self):
        self.cancelled = True


class FakeStub:
    def __init__(self):
        self.requests: list = []
        self.error: grpc.aio.AioRpcError | None = None
        self.stream_error: grpc.aio.AioRpcError | None = None
        self.served = SERVED

    async def GetModelInfo(self, request, timeout=None):
        return policy_pb2.GetModelInfoResponse(model=self.served, weights_version=3)

    async def Generate(self, request, timeout=None):
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        reply = policy_pb2.GenerateResponse(model=self.served, weights_version=3)
        for p in range(len(request.prompts)):
            completion = reply.completions.add(prompt_index=p, prompt_token_ids=[1, 2, 3, 4])
            for j in range(request.sampling.n or 1):
                completion.samples.add(
                    response_id=f"r-{p}-{j}",
                    text="Hello!",
                    token_ids=TOKENS,
                    logprobs=[-0.25 - j] * 3,
                    finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    weights_version=3,
                    token_logprobs=positions(request.sampling, j),
                )
        return reply

    def GenerateStream(self, request, timeout=None):
        """Samples interleaved token by token, each ended by an empty final chunk."""
        self.requests.append(request)
        if self.error is not None:
            return FakeCall([], self.error)
        n = request.sampling.n or 1
        chunks = []
        for k, t in enumerate(TOKENS):
            for j in range(n):
                chunks.append(
                    policy_pb2.GenerateStreamResponse(
                        sample_index=j,
                        response_id=f"s-{j}",
                        token_ids=[t],
                        logprobs=[-0.25 - j],
                        text_delta=TEXTS[t],
                        weights_version=3,
                        token_logprobs=positions(request.sampling, j)[k : k + 1],
                        prompt_tokens=4,
                    )
                )
        for j in range(n):
            chunks.append(
                policy_pb2.GenerateStreamResponse(
                    sample_index=j,
                    response_id=f"s-{j}",
                    finish_reason=common_pb2.FINISH_REASON_LENGTH,
                    weights_version=3,
                    prompt_tokens=4,
                )
            )
        return FakeCall(chunks, self.stream_error)


class FakePolicyClient:
    timeout_s = 10.0
    model_info = PolicyClient.model_info

    def __init__(self):
        self.stub = FakeStub()
