"""Triton killed (-9) under a model service (the reference service, on a Triton of its own) while
a caller computes log-probs: the service turns NOT_SERVING and refuses calls at once with
UNAVAILABLE (no call waits out its deadline on a dead model); Triton started again, it loads
its model, reports SERVING and answers exactly as before.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.chaos_scenarios import ChaosEnv, Row, wait_for
from bench.workers import Workers
from deploy.local.triton import TritonServer
from services.genproto.rlhf.v1 import reference_pb2, reference_pb2_grpc
from tests.support.scoring_stacks import reference_stack

SEQUENCES = reference_pb2.ComputeLogprobsRequest(
    sequences=[reference_pb2.TokenSequence(prompt_token_ids=[5, 6, 7], response_token_ids=[8, 9])]
)
FAST_S = 2.0
"""A refusal while Triton is down must come within this (the call's deadline is 10 s)."""


class LogprobCaller(Workers):
    """One thread calling ComputeLogprobs until stopped: answers, fast refusals, other failures."""

    def __init__(self, stub):
        self.stub = stub
        self.answers: list[tuple[float, ...]] = []
        self.refused_fast = 0
        self.bad_failures: list[str] = []
        super().__init__(join_timeout_s=30)

    def work(self, _n: int) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                reply = self.stub.ComputeLogprobs(SEQUENCES, timeout=10)
                self.answers.append(tuple(reply.results[0].logprobs))
            except grpc.RpcError as exc:
                took = time.monotonic() - started
                if exc.code() == grpc.StatusCode.UNAVAILABLE and took < FAST_S:
                    self.refused_fast += 1
                else:
                    self.bad_failures.append(f"{exc.code().name} after {took:.1f}s")
                time.sleep(0.05)


def triton_kill(env: ChaosEnv, kills: int = 1) -> Row:
    row = Row("Triton kill -9 under a model service")
    state = env.folder("triton-kill")
    server = TritonServer(state_dir=state / "triton", model_repository=state / "repo")
    server.model_repository.mkdir(exist_ok=True)
    server.start()
    try:
        with reference_stack(server, env.lm_dir, triton_health_interval_s=0.5) as stack:
            channel = grpc.insecure_channel(stack.address)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="rlhf.v1.ReferenceService")

            def status() -> int:
                return health.Check(check, timeout=5).status

            stub = reference_pb2_grpc.ReferenceServiceStub(channel)
            before = tuple(stub.ComputeLogprobs(SEQUENCES, timeout=60).results[0].logprobs)
            with LogprobCaller(stub) as caller:
                for _ in range(kills):
                    answered = len(caller.answers)
                    wait_for(lambda answered=answered: len(caller.answers) >= answered + 3, 60)
                    server.daemon.kill()
                    row.injected += 1
                    row.check(
                        wait_for(
                            lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 15
                        ),
                        "NOT_SERVING within 15 s of the kill",
                    )
                    refused = caller.refused_fast
                    row.check(
                        wait_for(lambda refused=refused: caller.refused_fast > refused, 10),
                        f"calls refused with UNAVAILABLE within {FAST_S} s while Triton is down",
                    )
                    server.start()
                    row.check(
                        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 180),
                        "SERVING again once Triton is back",
                    )
                    answered = len(caller.answers)
                    row.check(
                        wait_for(lambda answered=answered: len(caller.answers) >= answered + 3, 60),
                        "calls answered again after the recovery",
                    )
            channel.close()
    finally:
        server.stop()
    row.requests_failed = caller.refused_fast + len(caller.bad_failures)
    row.check(not caller.bad_failures, f"only fast UNAVAILABLE refusals: {caller.bad_failures[:3]}")
    row.check(set(caller.answers) == {before}, "every answer, before and after, is the same")
    row.acknowledged = row.found = len(caller.answers)
    row.notes.append(
        f"{len(caller.answers)} calls answered; {caller.refused_fast} refused at once "
        "(UNAVAILABLE) while Triton was down, as designed"
    )
    return row
