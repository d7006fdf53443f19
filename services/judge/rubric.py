"""What the judge is asked, and how its two answers become one verdict: the rubric files, the
constitution, the judge prompt, and the order-debiasing formula. Pure functions of text.

A rubric file is YAML with `version` and `rubric` (the text the judge reads); a constitution
file has `version` and `principles`, each with `name`, `rule` (one line the judge reads),
`critique` and `revision` (the requests `rlhf cai-sft` puts to the policy). Either kind can be
the judge's rubric (`load_rubric`); a constitution becomes one by listing its rules.

    rubric = load_rubric(DEFAULT_RUBRIC)             # Rubric(version="default-v1", text=...)
    messages = judge_messages(rubric, "2+2?", "4", "5")   # answer "4" shown as A
    p = combine(p_a_first=0.9, p_b_first=0.3)        # 0.8: P(A better), both orders
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DEFAULT_RUBRIC = HERE / "rubrics" / "default-v1.yaml"
DEFAULT_CONSTITUTION = HERE / "constitutions" / "v1.yaml"
LETTERS = ("A", "B")
"""The verdict tokens: the judge's next-token probabilities of these two letters."""


class RubricError(ValueError):
    """A rubric or constitution file is unusable; the message names the file and the field."""


@dataclass(frozen=True)
class Principle:
    name: str
    rule: str
    """One line the judge reads: what an answer that follows the principle does."""
    critique: str
    """Asked of the policy about its own answer."""
    revision: str
    """Asked of the policy after its critique."""


@dataclass(frozen=True)
class Constitution:
    version: str
    principles: tuple[Principle, ...]

    def rubric(self) -> Rubric:
        """The judge's rubric made from the principles' rules (same version)."""
        rules = "\n".join(f"- {p.name}: {p.rule}" for p in self.principles)
        text = (
            "You compare two answers to the same request and pick the better one.\n"
            "The better answer follows these principles more closely:\n"
            f"{rules}\n"
            "Ignore which answer comes first and how long each is; judge only the content."
        )
        return Rubric(self.version, text)


@dataclass(frozen=True)
class Rubric:
    version: str
    text: str


def _read_yaml(path: Path) -> dict:
    path = Path(path)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RubricError(f"{path}: cannot read: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise RubricError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise RubricError(f"{path}: expected a mapping with 'version'")
    version = loaded.get("version")
    if not isinstance(version, str) or not version.strip():
        raise RubricError(f"{path}: 'version' must be a non-empty string, got {version!r}")
    return loaded


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RubricError(f"{where} must be a non-empty string, got {value!r:.60}")
    return value.strip()


def load_constitution(path: Path) -> Constitution:
    """The constitution in `path`; RubricError names the file and the principle at fault."""
    loaded = _read_yaml(path)
    principles = loaded.get("principles")
    if not isinstance(principles, list) or not principles:
        raise RubricError(f"{path}: 'principles' must be a non-empty list")
    parsed, names = [], set()
    for i, entry in enumerate(principles):
        where = f"{path}: principles[{i}]"
        if not isinstance(entry, dict):
            raise RubricError(f"{where} must be a mapping of name, rule, critique, revision")
        name = _text(entry.get("name"), f"{where}.name")
        if name in names:
            raise RubricError(f"{where}.name: {name!r} appears twice")
        names.add(name)
        parsed.append(
            Principle(
                name,
                _text(entry.get("rule"), f"{where}.rule"),
                _text(entry.get("critique"), f"{where}.critique"),
                _text(entry.get("revision"), f"{where}.revision"),
            )
        )
    return Constitution(loaded["version"].strip(), tuple(parsed))


def load_rubric(path: Path) -> Rubric:
    """A rubric file's rubric, or a constitution file's rubric made from its principles."""
    loaded = _read_yaml(path)
    if "principles" in loaded:
        return load_constitution(path).rubric()
    return Rubric(loaded["version"].strip(), _text(loaded.get("rubric"), f"{path}: 'rubric'"))


def judge_messages(rubric: Rubric, question: str, first: str, second: str) -> list[dict[str, str]]:
    """The chat the judge continues: the rubric as the system turn, then the question and the
    two answers, `first` shown as A and `second` as B, and the request for one letter. The
    judge's reply is read from its next token, so the prompt ends where that letter goes."""
    user = (
        f"Question:\n{question}\n\n"
        f"Answer A:\n{first}\n\n"
        f"Answer B:\n{second}\n\n"
        "Which answer is better by the rubric? Reply with one letter: A or B."
    )
    return [{"role": "system", "content": rubric.text}, {"role": "user", "content": user}]


def combine(p_a_first: float, p_b_first: float) -> float:
    """P(A better) from both orders, cancelling position bias:

        p = (p_a_first + (1 - p_b_first)) / 2

    `p_a_first` is P(first-shown better) when A is shown first; `p_b_first` is P(first-shown
    better) when B is shown first, so `1 - p_b_first` is that order's P(A better). A judge that
    always prefers the first answer (p_a_first = p_b_first = q) gets p = 0.5, a tie."""
    return (p_a_first + (1.0 - p_b_first)) / 2.0


def confidence(p: float) -> float:
    """|2p - 1|: 0 for a tie, 1 for a certain verdict either way."""
    return abs(2.0 * p - 1.0)
