"""The batched decoding loop in process: left padding, KV cache and per-row stop conditions give
what Hugging Face `generate` gives, row by row."""

from __future__ import annotations

import pytest
import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.policy.generation import Finish, Row, generate_rows
from services.policy.sampling import RowSampling


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    torch.set_num_threads(1)
    return load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32), load_tokenizer(tiny_lm_dir)


def greedy(max_new: int, stop: list[str] | None = None) -> RowSampling:
    return RowSampling(0.0, 1.0, 0, 0)


def test_batched_greedy_equals_generate_per_prompt(lm):
    model, tok = lm
    prompts = ["The cat sat on", "Hello", "A much longer prompt with quite a few more tokens in it"]
    rows = [Row(tok(p)["input_ids"], 12, greedy(12)) for p in prompts]
    generate_rows(model, rows, tok.pad_token_id, {-1}, lambda t: tok.decode(t))
    for p, row in zip(prompts, rows):
        ids = torch.tensor([tok(p)["input_ids"]])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                  eos_token_id=None, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        assert row.tokens == expected.tolist()
        assert row.finish == Finish.LENGTH


def test_stop_conditions_per_row(lm):
    model, tok = lm
    ids = tok("The cat sat on")["input_ids"]
    probe = [Row(ids, 6, greedy(6))]
    generate_rows(model, probe, tok.pad_token_id, set(), lambda t: tok.decode(t))
    first, third = probe[0].tokens[0], probe[0].tokens[2]
    stop_text = tok.decode(probe[0].tokens[:3])[-2:]
    rows = [
        Row(ids, 6, greedy(6)),                          # length
        Row(ids, 6, greedy(6)),                          # end of sequence at the first token
        Row(ids, 6, greedy(6), stop=[stop_text]),        # stop string inside the third token
    ]
    steps = []
    generate_rows(model, rows, tok.pad_token_id, {first}, lambda t: tok.decode(t),
                  on_token=lambda i, t, lp, f: steps.append((i, t, f)))
    assert rows[0].finish == Finish.STOP and rows[0].tokens == [first]  # eos applies to every row
    rows = [Row(ids, 6, greedy(6)), Row(ids, 6, greedy(6), stop=[stop_text])]
    generate_rows(model, rows, tok.pad_token_id, set(), lambda t: tok.decode(t))
    assert rows[0].finish == Finish.LENGTH and len(rows[0].tokens) == 6
    assert rows[1].finish == Finish.STOP_STRING and rows[1].tokens[-1] in (probe[0].tokens[1], third)


def test_cancelled_row_stops_and_others_continue(lm):
    model, tok = lm
    ids = tok("Hello")["input_ids"]
    rows = [Row(ids, 10, greedy(10)), Row(ids, 10, greedy(10))]
    generate_rows(model, rows, tok.pad_token_id, set(), lambda t: tok.decode(t),
                  cancelled=lambda i: i == 1 and len(rows[1].tokens) >= 3)
    assert rows[1].finish == Finish.CANCELLED and len(rows[1].tokens) == 3
    assert rows[0].finish == Finish.LENGTH and len(rows[0].tokens) == 10
