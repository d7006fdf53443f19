"""A streamed sample's text adds up to the unary answer's: cut before a stop string, with
incomplete characters and stop-string prefixes held back until they are settled."""

from __future__ import annotations

import pytest

from services.policy.detokenize import StreamedText, position_logprobs, visible_text
from services.policy.sampling import first_stop_string


def stream(pieces: list[str], stops: list[str], stop_at: int | None = None) -> list[str]:
    """Feeds one 'token' per piece (the decode of ids is the join of their pieces); the sample
    stops on a stop string at index `stop_at`, else runs to the end (final)."""
    text = StreamedText(lambda ids: "".join(pieces[i] for i in ids), stops)
    deltas = []
    for i in range(len(pieces)):
        stopped = stop_at == i
        deltas.append(text.push([i], stopped=stopped, final=False))
        if stopped:
            return deltas
    deltas.append(text.push([], stopped=False, final=True))
    return deltas


def test_stop_string_split_over_tokens_is_never_streamed():
    pieces = ["Hello", " wor", "ld", " ST", "OP", " after"]
    deltas = stream(pieces, ["STOP"], stop_at=4)
    assert "".join(deltas) == visible_text("".join(pieces[:5]), ["STOP"], True) == "Hello world "
    assert deltas[3] == " "  # " ST" could start "STOP": held back, the space is released
    assert all("S" not in d for d in deltas)


def test_a_prefix_of_a_stop_string_that_is_not_one_is_released():
    deltas = stream(["a", " ST", "ART", " b"], ["STOP"])
    assert deltas[1] == " "  # "ST" held back ...
    assert deltas[2] == "START"  # ... and released when it turned out not to be "STOP"
    assert "".join(deltas) == "a START b"


def test_incomplete_characters_wait_for_their_bytes():
    # A byte-level tokenizer decodes a half character as U+FFFD until its other bytes come.
    decoded = {1: "caf", 2: "caf\ufffd", 3: "café", 4: "café!"}
    text = StreamedText(lambda ids: decoded[len(ids)], [])
    deltas = [text.push([i], stopped=False, final=False) for i in range(4)]
    assert deltas == ["caf", "", "é", "!"]


@pytest.mark.parametrize("stops", [[], ["x"], ["lo w", "d!"]])
def test_streamed_text_always_adds_up_to_the_unary_text(stops):
    pieces = ["He", "llo", " w", "or", "ld", "!"]
    joined = "".join(pieces)
    hit = [first_stop_string("".join(pieces[: i + 1]), stops) >= 0 for i in range(len(pieces))]
    stop_at = hit.index(True) if any(hit) else None
    deltas = stream(pieces, stops, stop_at)
    unary = "".join(pieces[: stop_at + 1]) if stop_at is not None else joined
    assert "".join(deltas) == visible_text(unary, stops, stop_at is not None)


def test_position_logprobs_pair_each_token_with_its_alternatives():
    texts = {5: "a", 6: "b", 7: "c"}
    positions = position_logprobs(
        lambda ids: [texts[i] for i in ids],
        [5, 6],
        [-0.1, -2.0],
        [[5, 7], [7, 6]],
        [[-0.1, -3.0], [-0.5, -2.0]],
    )
    assert [(p.sampled.token_id, p.sampled.text, p.sampled.logprob) for p in positions] == [
        (5, "a", pytest.approx(-0.1)),
        (6, "b", pytest.approx(-2.0)),
    ]
    assert [(t.token_id, t.text) for t in positions[1].top] == [(7, "c"), (6, "b")]
    no_top = position_logprobs(lambda ids: [texts[i] for i in ids], [7], [-1.0], [], [])
    assert len(no_top) == 1 and list(no_top[0].top) == []
