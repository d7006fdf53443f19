"""Demonstration and preference data from local files, in the column conventions of TRL.

One row a record, JSONL (one JSON object a line) or Parquet. Columns other than these are
ignored, so TRL-style datasets with extra columns (`id`, `score_chosen`, ...) load as they are.

| kind            | stage                    | columns                                                 |
| --------------- | ------------------------ | ------------------------------------------------------- |
| `demonstration` | sft                      | `prompt`, `completion`; or `messages` (chat, ends with  |
|                 |                          | the assistant turn whose tokens carry the loss)         |
| `preference`    | train-reward, dpo        | `prompt`, `chosen`, `rejected`; or `prompt`,            |
|                 |                          | `responses` (ranking best to worst, K >= 2), expanded   |
|                 |                          | to its K(K-1)/2 ordered pairs; optional `source`        |
|                 |                          | (`human`, the default, or `ai`) and `cohort` (string)   |
| `labelled`      | kto                      | `prompt`, `completion`, `label` (bool: thumbs up/down)  |

Text is a non-empty string, or (for LM stages) a TRL conversational list of chat messages
`[{"role": ..., "content": ...}]`. Bad data raises `DataError` naming file, row and column.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]
Text = str | Messages


class DataError(ValueError):
    """A data file or one of its rows is unusable; the message names file, row and column."""


class DataKind(str, Enum):
    DEMONSTRATION = "demonstration"
    PREFERENCE = "preference"
    LABELLED = "labelled"


@dataclass(frozen=True)
class Demonstration:
    prompt: Text
    completion: Text


SOURCES = ("human", "ai")
"""Who labelled a preference pair: a person, or an AI judge (RLAIF)."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: Text
    chosen: Text
    rejected: Text
    source: str = "human"
    """`human` or `ai` (one of SOURCES): the reward stage weighs them by its settings."""
    cohort: str = ""
    """The annotator cohort that labelled it (empty: unknown)."""


@dataclass(frozen=True)
class LabelledCompletion:
    prompt: Text
    completion: Text
    label: bool
    """True for a desirable completion (thumbs up), False for an undesirable one."""


Record = Demonstration | PreferencePair | LabelledCompletion


# ---------------------------------------------------------------------------------------------
# Reading rows


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open("r", encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg} at column {err.colno})"
                ) from err
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            # A null is a missing column: a file mixing pairs and rankings has nulls in both.
            yield f"{path} row {number}", {k: v for k, v in row.items() if v is not None}


ROW_READERS: dict[str, Callable[[Path], Iterator[tuple[str, dict]]]] = {
    ".jsonl": _jsonl_rows,
    ".json": _jsonl_rows,
    ".parquet": _parquet_rows,
}


def read_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) for each row of a JSONL or Parquet file; `where` is 'FILE line N'/'row N'."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    reader = ROW_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(ROW_READERS)}"
        )
    return reader(path)


# ---------------------------------------------------------------------------------------------
# Checking columns


def _text(row: dict, column: str, where: str, chat_allowed: bool) -> Text:
    if column not in row or row[column] is None:
        raise DataError(f"{where}: missing column '{column}' (columns present: {sorted(row)})")
    value = row[column]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: column '{column}' is an empty string")
        return value
    if isinstance(value, list) and chat_allowed:
        return _messages(value, column, where)
    allowed = (
        "a non-empty string or a list of chat messages" if chat_allowed else "a non-empty string"
    )
    raise DataError(f"{where}: column '{column}' must be {allowed}, got {type(value).__name__}")


def _messages(value: list, column: str, where: str) -> Messages:
    if not value:
        raise DataError(f"{where}: column '{column}' is an empty message list")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: column '{column}'[{index}] must be an object with role and content"
            )
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role or not isinstance(content, str):
            raise DataError(
                f"{where}: column '{column}'[{index}] needs string 'role' and 'content', got {message!r:.120}"
            )
        messages.append({"role": role, "content": content})
    return messages


def _assistant_completion(completion: Text, column: str, where: str) -> None:
    if isinstance(completion, list) and completion[-1]["role"] != "assistant":
        raise DataError(f"{where}: column '{column}' must end with an assistant message")


def _same_form(prompt: Text, others: dict[str, Text], where: str) -> None:
    """A chat prompt goes with chat completions, a plain prompt with plain ones."""
    for column, text in others.items():
        if isinstance(text, list) != isinstance(prompt, list):
            raise DataError(
                f"{where}: column '{column}' and 'prompt' must both be strings or both chat message lists"
            )


def parse_demonstration(row: dict, where: str, chat_allowed: bool = True) -> list[Record]:
    if "messages" in row and "prompt" not in row:
        messages = _text(row, "messages", where, chat_allowed=True)
        if isinstance(messages, str) or len(messages) < 2:
            raise DataError(
                f"{where}: column 'messages' needs at least a user and an assistant message"
            )
        _assistant_completion(messages, "messages", where)
        return [Demonstration(prompt=messages[:-1], completion=messages[-1:])]
    prompt = _text(row, "prompt", where, chat_allowed)
    completion = _text(row, "completion", where, chat_allowed)
    _same_form(prompt, {"completion": completion}, where)
    _assistant_completion(completion, "completion", where)
    return [Demonstration(prompt=prompt, completion=completion)]


def _labeller(row: dict, where: str) -> dict[str, str]:
    """The optional `source` and `cohort` columns of a preference row."""
    source = row.get("source", "human")
    if source not in SOURCES:
        raise DataError(
            f"{where}: column 'source' must be one of {list(SOURCES)}, got {source!r:.40}"
        )
    cohort = row.get("cohort", "")
    if not isinstance(cohort, str):
        raise DataError(f"{where}: column 'cohort' must be a string, got {type(cohort).__name__}")
    return {"source": source, "cohort": cohort}


def parse_preference(row: dict, where: str, chat_allowed: bool = True) -> list[Record]:
    prompt = _text(row, "prompt", where, chat_allowed)
    labeller = _labeller(row, where)
    if "responses" in row and "chosen" not in row:
        ranking = row["responses"]
        if not isinstance(ranking, list) or len(ranking) < 2:
            raise DataError(
                f"{where}: column 'responses' must be a list of K >= 2 responses, best first"
            )
        responses = [
            _text({f"responses[{i}]": r}, f"responses[{i}]", where, chat_allowed)
            for i, r in enumerate(ranking)
        ]
        _same_form(prompt, {f"responses[{i}]": r for i, r in enumerate(responses)}, where)
        if len({json.dumps(r, sort_keys=True) for r in responses}) != len(responses):
            raise DataError(f"{where}: column 'responses' holds the same response twice")
        # Every better-ranked response is preferred to every worse-ranked one: K(K-1)/2 pairs.
        pairs = itertools.combinations(range(len(responses)), 2)
        return [PreferencePair(prompt, responses[i], responses[j], **labeller) for i, j in pairs]
    chosen = _text(row, "chosen", where, chat_allowed)
    rejected = _text(row, "rejected", where, chat_allowed)
    _same_form(prompt, {"chosen": chosen, "rejected": rejected}, where)
    if chosen == rejected:
        raise DataError(f"{where}: columns 'chosen' and 'rejected' are the same response")
    return [PreferencePair(prompt, chosen, rejected, **labeller)]


def parse_labelled(row: dict, where: str, chat_allowed: bool = True) -> list[Record]:
    prompt = _text(row, "prompt", where, chat_allowed)
    completion = _text(row, "completion", where, chat_allowed)
    _same_form(prompt, {"completion": completion}, where)
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(
            f"{where}: column 'label' must be a boolean (true = desirable), got {label!r:.40}"
        )
    return [LabelledCompletion(prompt, completion, label)]


ROW_PARSERS: dict[DataKind, Callable[[dict, str, bool], list[Record]]] = {
    DataKind.DEMONSTRATION: parse_demonstration,
    DataKind.PREFERENCE: parse_preference,
    DataKind.LABELLED: parse_labelled,
}


def load_records(path: Path, kind: DataKind, chat_allowed: bool = True) -> list[Record]:
    """Every record of a data file, rankings expanded to pairs; DataError on the first bad row."""
    parse = ROW_PARSERS[DataKind(kind)]
    records: list[Record] = []
    for where, row in read_rows(path):
        records.extend(parse(row, where, chat_allowed))
    if not records:
        raise DataError(f"{path}: holds no rows")
    return records


# ---------------------------------------------------------------------------------------------
# Held-out split and provenance


def prompt_bucket(prompt: Text) -> float:
    """A stable number in [0, 1) from the prompt alone, so a split survives appended data."""
    digest = hashlib.sha256(json.dumps(prompt, sort_keys=True).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(records: list[Any], eval_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, eval): all records of one prompt (e.g. one ranking's pairs) land on the same side."""
    train = [r for r in records if prompt_bucket(r.prompt) >= eval_fraction]
    held_out = [r for r in records if prompt_bucket(r.prompt) < eval_fraction]
    return train, held_out


# ---------------------------------------------------------------------------------------------
# Agreement between labellers


def _comparison(pair: PreferencePair) -> tuple[str, str]:
    """(key of the prompt and the unordered answer pair, key of the winner)."""
    prompt, chosen, rejected = (
        json.dumps(t, sort_keys=True) for t in (pair.prompt, pair.chosen, pair.rejected)
    )
    return json.dumps([prompt, sorted([chosen, rejected])]), chosen


@dataclass(frozen=True)
class Agreement:
    """How often two labels of the same comparison pick the same winner."""

    label_pairs: int
    """Pairs of labels compared (each of a different labeller group, same comparison)."""
    agreeing: int

    @property
    def share(self) -> float | None:
        """agreeing / label_pairs; None when nothing could be compared."""
        return self.agreeing / self.label_pairs if self.label_pairs else None


def label_agreement(
    pairs: list[PreferencePair], group: Callable[[PreferencePair], str | None]
) -> Agreement:
    """Agreement of labels from different groups on the same (prompt, unordered answer pair).

    `group` names each pair's labeller group (None: left out). Every two labels of one comparison
    whose groups differ are one label pair; they agree when they pick the same winner. E.g.
    `group=lambda p: p.cohort if p.source == "human" else None` is inter-cohort agreement.
    """
    by_comparison: dict[str, list[tuple[str, str]]] = {}
    for pair in pairs:
        name = group(pair)
        if name is not None:
            key, winner = _comparison(pair)
            by_comparison.setdefault(key, []).append((name, winner))
    label_pairs = agreeing = 0
    for labels in by_comparison.values():
        for (group_a, winner_a), (group_b, winner_b) in itertools.combinations(labels, 2):
            if group_a != group_b:
                label_pairs += 1
                agreeing += winner_a == winner_b
    return Agreement(label_pairs, agreeing)


def human_cohort(pair: PreferencePair) -> str | None:
    """Inter-cohort agreement's groups: the cohort of a human label (AI labels and labels of
    unknown cohort left out)."""
    return pair.cohort if pair.source == "human" and pair.cohort else None


def source_of(pair: PreferencePair) -> str:
    """Judge-human agreement's groups: `ai` against `human`."""
    return pair.source
