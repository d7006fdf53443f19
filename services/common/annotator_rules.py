"""Rule-based annotators: transparent judges that stand in for people in the demo, the tests and
`rlhf eval` (see services.common.annotator for how a score becomes rankings and thumbs).

Each rule is `score(prompt, answer) -> float` in [0, 1], a weighted sum of parts that a reader
can check by hand, with the threshold of a thumbs-up as its `thumbs_up_at` attribute.

`helpful_concise` is the demo's annotator: a good answer to a quick question is short, complete,
on topic and does not repeat itself. The other rules judge other tastes (a longer window,
formatting, politeness, topicality); they exist to check that the loop learns whatever rule it
is given, not only the shipped one:

    make demo ANNOTATOR=services.common.annotator_rules:polite

Words are runs of letters, digits and apostrophes. A question's content words are its words of
four letters or more that are not stop words, lower-cased, with a final "s" dropped.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z0-9']+")
_STOP = frozenset(
    """about above after again also because been before being below between both could does
    doing done down during each from further have having here how into just like make many more
    most much other over same should some such than that their them then there these they this
    those through under until very want what when where which while will with would your yours
    tell give explain describe please thing things good best really need know""".split()  # noqa: SIM905
)
_ENDINGS = (".", "!", "?")
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+\S")
_COURTEOUS_OPENERS = (
    "sure",
    "of course",
    "certainly",
    "good question",
    "great question",
    "happy to help",
    "glad you asked",
    "absolutely",
)
_COURTEOUS_CLOSERS = (
    "hope this helps",
    "hope that helps",
    "let me know",
    "happy to help",
    "good luck",
)
_RUDE = frozenset("stupid dumb idiot obviously duh whatever shut".split())  # noqa: SIM905


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def content_words(text: str) -> set[str]:
    """Lower-cased words of 4+ letters that are not stop words, with a final "s" dropped."""
    found = set()
    for word in words(text.lower()):
        word = word.strip("'")
        if len(word) >= 4 and word not in _STOP:
            found.add(word[:-1] if word.endswith("s") and len(word) > 4 else word)
    return found


def window(n: int, low: int, high: int, zero_at: int) -> float:
    """1 inside [low, high]; n / low below it; falling linearly to 0 at `zero_at` above it."""
    if n < low:
        return n / low
    if n <= high:
        return 1.0
    return max(0.0, 1.0 - (n - high) / (zero_at - high))


def complete(answer: str) -> float:
    """1 when the answer ends a sentence (., ! or ?, closing quotes and brackets aside)."""
    return 1.0 if answer.rstrip().rstrip("\"')]").endswith(_ENDINGS) else 0.0


def topical(prompt: str, answer: str) -> float:
    """Share of the question's content words (up to 3 of them) that the answer uses."""
    asked = content_words(prompt)
    if not asked:
        return 1.0
    used = len(asked & content_words(answer))
    return min(1.0, used / min(3, len(asked)))


def fresh(answer: str) -> float:
    """1 minus the share of word trigrams that already occurred earlier in the answer."""
    tokens = [w.lower() for w in words(answer)]
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    if not trigrams:
        return 1.0
    return len(set(trigrams)) / len(trigrams)


def list_items(answer: str) -> int:
    return sum(1 for line in answer.splitlines() if _LIST_ITEM.match(line))


def helpful_concise(prompt: str, answer: str) -> float:
    """The demo's rule: 0.35 brevity (10-40 words full credit, none from 100) + 0.25 ends a
    sentence + 0.25 uses the question's content words + 0.15 no repeated trigrams."""
    return (
        0.35 * window(len(words(answer)), 10, 40, 100)
        + 0.25 * complete(answer)
        + 0.25 * topical(prompt, answer)
        + 0.15 * fresh(answer)
    )


helpful_concise.thumbs_up_at = 0.8


def detailed(prompt: str, answer: str) -> float:
    """Another length window: 0.4 for 30-70 words (none under 5 or from 150) + 0.3 complete +
    0.3 topical."""
    n = len(words(answer))
    return 0.4 * window(n, 30, 70, 150) + 0.3 * complete(answer) + 0.3 * topical(prompt, answer)


detailed.thumbs_up_at = 0.8


def structured(prompt: str, answer: str) -> float:
    """Formatting: 0.5 for a list of 2-5 items (0.25 for a single item or over 5) + 0.2
    complete + 0.3 topical."""
    items = list_items(answer)
    shape = 1.0 if 2 <= items <= 5 else 0.25 if items else 0.0
    return 0.5 * shape + 0.2 * complete(answer) + 0.3 * topical(prompt, answer)


structured.thumbs_up_at = 0.7


def polite(prompt: str, answer: str) -> float:
    """Politeness: 0.3 a courteous opener + 0.3 a courteous closing + 0.2 complete + 0.2 no rude
    words."""
    lowered = answer.strip().lower()
    opener = 1.0 if lowered.startswith(_COURTEOUS_OPENERS) else 0.0
    closer = 1.0 if any(c in lowered[-80:] for c in _COURTEOUS_CLOSERS) else 0.0
    civil = 0.0 if _RUDE & {w.lower() for w in words(answer)} else 1.0
    return 0.3 * opener + 0.3 * closer + 0.2 * complete(answer) + 0.2 * civil


polite.thumbs_up_at = 0.6


def on_topic(prompt: str, answer: str) -> float:
    """Topicality: 0.6 the share of the question's content words the answer uses (all of them,
    not 3) + 0.2 the share of the answer's sentences that use one + 0.2 complete."""
    asked = content_words(prompt)
    if not asked:
        return 0.8 + 0.2 * complete(answer)
    coverage = len(asked & content_words(answer)) / len(asked)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    focused = sum(1 for s in sentences if asked & content_words(s)) / max(1, len(sentences))
    return 0.6 * coverage + 0.2 * focused + 0.2 * complete(answer)


on_topic.thumbs_up_at = 0.7
