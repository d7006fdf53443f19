"""A rule-based judge for the tests: the longer answer (in characters) is better, so the verdict
on any two answers can be computed by hand."""


def longer(prompt: str, answer: str) -> float:
    return float(len(answer))
