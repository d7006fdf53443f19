"""Synthetic data with learnable rules for the offline-stage tests, written as JSONL/Parquet."""

from __future__ import annotations

import json
import random
from pathlib import Path

NEUTRAL = [
    "the",
    "a",
    "an",
    "item",
    "box",
    "shop",
    "price",
    "order",
    "colour",
    "size",
    "delivery",
    "week",
    "day",
    "table",
    "lamp",
    "chair",
    "door",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(
        dict.fromkeys(key for row in rows for key in row)
    )  # from_pylist reads only row 1's keys
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)
    return path


def _sentence(rng: random.Random, words: int, marker: str | None = None) -> str:
    chosen = [rng.choice(NEUTRAL) for _ in range(words)]
    if marker is not None:
        chosen.insert(rng.randrange(words + 1), marker)
    return " ".join(chosen)


def reward_rows(count: int, seed: int, rankings_every: int = 3) -> list[dict]:
    """Preference rows of a learnable rule: 'excellent' beats 'fine' beats neither.

    Every `rankings_every`-th row is a ranking of 3 (excellent > fine > plain); the others are
    pairs of a response with 'excellent' or 'fine' against a plain one or a 'fine' one.
    """
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        prompt = f"review {index}: {_sentence(rng, 3)}"
        if rankings_every and index % rankings_every == 0:
            responses = [
                _sentence(rng, 5, "excellent"),
                _sentence(rng, 5, "fine"),
                _sentence(rng, 5),
            ]
            rows.append({"prompt": prompt, "responses": responses})
        else:
            better, worse = rng.choice([("excellent", None), ("excellent", "fine"), ("fine", None)])
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": _sentence(rng, 5, better),
                    "rejected": _sentence(rng, 5, worse),
                }
            )
    return rows


def colour_pairs(count: int, seed: int) -> list[dict]:
    """Preference pairs for a causal LM: after 'Q: colour of item N?' answer ' blue', not ' red'."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Q: colour of item {rng.randrange(10_000)}?\nA:",
            "chosen": " blue",
            "rejected": " red",
        }
        for _ in range(count)
    ]


def colour_labels(count: int, seed: int) -> list[dict]:
    """KTO rows: ' blue' is desirable, ' red' undesirable, half each."""
    rng = random.Random(seed)
    return [
        {
            "prompt": f"Q: colour of item {rng.randrange(10_000)}?\nA:",
            "completion": " blue" if i % 2 else " red",
            "label": bool(i % 2),
        }
        for i in range(count)
    ]


def counting_demonstrations(count: int, seed: int) -> list[dict]:
    """SFT rows: 'Count on from N:' -> ' N+1 N+2 N+3'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        start = rng.randrange(50)
        rows.append(
            {
                "prompt": f"Count on from {start}:",
                "completion": " " + " ".join(str(start + k) for k in (1, 2, 3)),
            }
        )
    return rows
