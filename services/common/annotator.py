"""The annotator: one function that judges one answer, from which rankings, thumbs and pairwise
verdicts all follow, so that they never disagree with each other.

    score(prompt: str, answer: str) -> float      # higher is better; any scale

Anything with that signature plugs in by name, `module:function` (`--annotator` of `rlhf eval`
and of the demo, `RLHF_TRAINER_GOLD_ANNOTATOR` of the trainer). The project's own rules live in
`services.common.annotator_rules`; a team's judge (a script, an LLM judge behind a function)
drops in the same way.

From one score:
- a ranking of K answers is the answers sorted by score, best first (ties keep their order);
- a thumb is up when the score reaches the rule's threshold (the function's `thumbs_up_at`
  attribute, else `DEFAULT_THUMBS_UP_AT`), down otherwise;
- a pairwise verdict is 1 (first better), 0 (second better) or 0.5 (a tie, equal scores).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ScoreFn = Callable[[str, str], float]

DEFAULT_ANNOTATOR = "services.common.annotator_rules:helpful_concise"
DEFAULT_THUMBS_UP_AT = 0.5


class AnnotatorError(ValueError):
    """The annotator named cannot be loaded, or it returned something that is not a score."""


@dataclass(frozen=True)
class Annotator:
    """A loaded score function with its name and thumbs-up threshold."""

    name: str
    """`module:function` as given."""
    score_fn: ScoreFn
    thumbs_up_at: float
    """Scores at or above it are a thumbs-up."""

    def score(self, prompt: str, answer: str) -> float:
        value = self.score_fn(prompt, answer)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AnnotatorError(f"{self.name} returned {value!r}, not a number")
        value = float(value)
        if not math.isfinite(value):
            raise AnnotatorError(f"{self.name} returned {value}, not a finite score")
        return value

    def rank(self, prompt: str, answers: Sequence[str]) -> list[int]:
        """Indices of `answers`, best first (a stable sort: equal scores keep their order)."""
        scores = [self.score(prompt, a) for a in answers]
        return sorted(range(len(answers)), key=lambda i: -scores[i])

    def thumb(self, prompt: str, answer: str) -> str:
        """ "up" or "down"."""
        return "up" if self.score(prompt, answer) >= self.thumbs_up_at else "down"

    def prefer(self, prompt: str, first: str, second: str) -> float:
        """1.0 when `first` is better, 0.0 when `second` is, 0.5 for a tie."""
        a, b = self.score(prompt, first), self.score(prompt, second)
        return 1.0 if a > b else 0.0 if a < b else 0.5


def load_annotator(spec: str = DEFAULT_ANNOTATOR) -> Annotator:
    """Imports `module:function`; AnnotatorError says what is wrong with the name."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AnnotatorError(f"annotator {spec!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AnnotatorError(f"annotator {spec!r}: cannot import {module_name}: {err}") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AnnotatorError(f"annotator {spec!r}: {module_name} has no function {attr}")
    try:
        inspect.signature(fn).bind("prompt", "answer")
    except TypeError as err:
        raise AnnotatorError(f"annotator {spec!r}: must take (prompt, answer): {err}") from err
    except ValueError:
        pass  # builtins without a signature: trust them
    threshold = float(getattr(fn, "thumbs_up_at", DEFAULT_THUMBS_UP_AT))
    return Annotator(spec, fn, threshold)
