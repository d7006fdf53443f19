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
    return load_causal_lm(tiny_lm_dir, torch.device("cpu"), torch.float32), load_tokenizer(
        tiny_lm_dir
    )


GREEDY = RowSampling(temperature=0.0, top_p=1.0, top_k=0, seed=0)


def test_batched_greedy_equals_generate_per_prompt(lm):
    model, tok = lm
    prompts = ["The cat sat on", "Hello", "A much longer prompt with quite a few more tokens in it"]
    rows = [Row(tok(p)["input_ids"], 12, GREEDY) for p in prompts]
    generate_rows(model, rows, tok.pad_token_id, {-1}, lambda t: tok.decode(t))
    for p, row in zip(prompts, rows):
        ids = torch.tensor([tok(p)["input_ids"]])
        expected = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )[0, ids.shape[1] :]
        assert row.tokens == expected.tolist()
        assert row.finish == Finish.LENGTH


def test_stop_conditions_per_row(lm):
    model, tok = lm
    decode = lambda t: tok.decode(t)
    ids = tok("The cat sat on")["input_ids"]
    free = generate_rows(model, [Row(ids, 6, GREEDY)], tok.pad_token_id, set(), decode)[0]
    # End of sequence: the first token plays it; the row stops right after emitting it.
    eos = generate_rows(model, [Row(ids, 6, GREEDY)], tok.pad_token_id, {free.tokens[0]}, decode)[0]
    assert eos.finish == Finish.STOP and eos.tokens == free.tokens[:1]
    # Stop string: the last two characters of the first three tokens' text.
    stop = decode(free.tokens[:3])[-2:]
    rows = [Row(ids, 6, GREEDY), Row(ids, 6, GREEDY, stop=[stop])]
    generate_rows(model, rows, tok.pad_token_id, set(), decode)
    assert rows[0].finish == Finish.LENGTH and rows[0].tokens == free.tokens
    assert rows[1].finish == Finish.STOP_STRING and stop in decode(rows[1].tokens)
    assert stop not in decode(rows[1].tokens[:-1]) and len(rows[1].tokens) <= 3


def test_cancelled_row_stops_and_others_continue(lm):
    model, tok = lm
    ids = tok("Hello")["input_ids"]
    rows = [Row(ids, 10, GREEDY), Row(ids, 10, GREEDY)]
    generate_rows(
        model,
        rows,
        tok.pad_token_id,
        set(),
        lambda t: tok.decode(t),
        cancelled=lambda i: i == 1 and len(rows[1].tokens) >= 3,
    )
    assert rows[1].finish == Finish.CANCELLED and len(rows[1].tokens) == 3
    assert rows[0].finish == Finish.LENGTH and len(rows[0].tokens) == 10
