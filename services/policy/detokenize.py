"""Token ids back to text for the gRPC answers: the text a streamed sample releases chunk by
chunk, and the per-token texts of log-prob listings.

A streamed sample must add up to what the unary answer says: decoded without special tokens
and cut before the first stop string (OpenAI's convention). While a sample runs, its text is
held back where it could still change: a trailing U+FFFD (a multi-byte character whose bytes
have not all been generated) and a suffix that is the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Callable

from services.genproto.rlhf.v1 import policy_pb2
from services.policy.sampling import first_stop_string

REPLACEMENT = "\ufffd"


def visible_text(text: str, stops: list[str], stopped: bool) -> str:
    """What a sample shows of its decoded `text`: cut before the first stop string when it
    stopped on one."""
    if stopped:
        return text[: max(first_stop_string(text, stops), 0)]
    return text


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may still change: an incomplete character, or the
    longest suffix that is a proper prefix of a stop string."""
    end = len(text.rstrip(REPLACEMENT))
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), longest, -1):
            if text[end - size : end] == stop[:size]:
                longest = size
                break
    return len(text) - end + longest


class StreamedText:
    """The released text of one streamed sample; `push` returns the new part (maybe empty)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.tokens: list[int] = []
        self.released = ""

    def push(self, tokens: list[int], stopped: bool, final: bool) -> str:
        self.tokens += tokens
        text = visible_text(self.decode(self.tokens), self.stops, stopped)
        if not (stopped or final):
            text = text[: len(text) - _held_back(text, self.stops)]
        if not text.startswith(self.released) or len(text) <= len(self.released):
            return ""
        delta, self.released = text[len(self.released) :], text
        return delta


def position_logprobs(
    token_text: Callable[[list[int]], list[str]],
    token_ids: list[int],
    logprobs: list[float],
    top_ids: list[list[int]],
    top_logprobs: list[list[float]],
) -> list[policy_pb2.PositionLogprobs]:
    """One PositionLogprobs per generated token; `token_text(ids)` is each id decoded alone."""
    alternatives = [list(zip(ids, lps)) for ids, lps in zip(top_ids, top_logprobs)]
    alternatives += [[] for _ in range(len(token_ids) - len(alternatives))]
    ids = list(token_ids) + [t for alts in alternatives for t, _ in alts]
    texts = dict(zip(ids, token_text(ids)))
    return [
        policy_pb2.PositionLogprobs(
            sampled=policy_pb2.TokenLogprob(token_id=t, text=texts[t], logprob=lp),
            top=[policy_pb2.TokenLogprob(token_id=a, text=texts[a], logprob=v) for a, v in alts],
        )
        for t, lp, alts in zip(token_ids, logprobs, alternatives)
    ]
