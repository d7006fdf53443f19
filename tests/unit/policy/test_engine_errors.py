"""A Triton stream that breaks while requests are sent is a ModelError (the servicer's
UNAVAILABLE, which callers retry on another replica), never an unmapped exception (UNKNOWN).
Found by `make chaos` (bench/NOTES.md): a replica whose Triton crashed answered UNKNOWN."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from services.common.settings import TritonSettings
from services.policy.engine import ModelError, PolicyEngine, SequenceRequest


class BrokenStreamClient:
    def __init__(self):
        self.stopped_with = None

    def start_stream(self, callback):
        pass

    def async_stream_infer(self, *args, **kwargs):
        raise InferenceServerException("The stream is no longer in valid state")

    def stop_stream(self, cancel_requests=False):
        self.stopped_with = cancel_requests

    def close(self):
        pass


def test_a_broken_stream_is_a_model_error_and_the_client_is_not_reused():
    engine = PolicyEngine(TritonSettings(url="127.0.0.1:1"), "policy")
    client = BrokenStreamClient()
    engine._client = lambda: client
    with pytest.raises(ModelError, match="no longer in valid state"):
        list(engine.run([SequenceRequest([1, 2], 4, 0.0, 1.0, 0, 0)], timeout_s=5))
    assert client.stopped_with is True  # what was sent is cancelled
    assert engine._pool.empty()  # an unhealthy client goes back to no pool
