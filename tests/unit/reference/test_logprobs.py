"""The batched, left-padded log-prob computation equals one unpadded forward per sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.common.models import load_causal_lm
from services.reference.logprobs import ScoredSequence, left_pad, response_logprobs


@pytest.fixture(scope="module")
def model(tiny_lm_dir):
    torch.set_num_threads(2)
    return load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32)


def test_left_pad_puts_real_tokens_right_with_positions_from_zero():
    seqs = [
        ScoredSequence(np.array([5, 6]), np.array([7])),
        ScoredSequence(np.array([1]), np.array([2, 3, 4, 8])),
    ]
    ids, mask, positions = left_pad(seqs, pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 8]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_batched_logprobs_equal_unpadded_forwards(model):
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (10, 1), (1, 12), (7, 7), (25, 3)]
    seqs = [ScoredSequence(rng.integers(0, 49152, p), rng.integers(0, 49152, a)) for p, a in shapes]
    batched = response_logprobs(model, seqs, torch.device("cpu"))
    for s, got in zip(seqs, batched):
        ids = torch.from_numpy(np.concatenate([s.prompt_ids, s.response_ids]))[None]  # (1, P + A)
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (P + A, V)
        p = len(s.prompt_ids)
        expected = [logprobs[p + j - 1, t].item() for j, t in enumerate(s.response_ids)]
        assert got.shape == (len(s.response_ids),) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
