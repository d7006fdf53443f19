"""Prompts for the rollout worker: a JSONL or Parquet file with a `prompt` column (plain text) or
a `messages` column (a chat: a list of {"role", "content"}), read into `rlhf.v1.Prompt`s.

    prompts = load_prompts(Path("data/prompts.jsonl"))

A row with neither column, an empty prompt or a malformed message is an error naming the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from services.genproto.rlhf.v1 import common_pb2

ROLES = {"system", "user", "assistant"}


def prompt_from_row(row: dict, where: str) -> common_pb2.Prompt:
    """One row as a Prompt; `where` names the row in errors."""
    if row.get("messages") is not None:
        messages = row["messages"]
        if isinstance(messages, str):
            messages = json.loads(messages)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"{where}: `messages` must be a non-empty list")
        chat = common_pb2.ChatMessages()
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(
                    f"{where}: message {i} needs a role in {sorted(ROLES)} and a text content"
                )
            chat.messages.add(role=m["role"], content=m["content"])
        return common_pb2.Prompt(messages=chat)
    if row.get("prompt") is not None:
        text = row["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: `prompt` must be a non-empty string")
        return common_pb2.Prompt(text=text)
    raise ValueError(f"{where}: needs a `prompt` or a `messages` column, has {sorted(row)}")


def _jsonl_rows(path: Path) -> Iterable[tuple[str, dict]]:
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path.name}:{n}: expected a JSON object")  # noqa: TRY004 - bad data
            yield f"{path.name}:{n}", row


def _parquet_rows(path: Path) -> Iterable[tuple[str, dict]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = [c for c in ("prompt", "messages") if c in table.column_names]
    if not columns:
        raise ValueError(
            f"{path.name}: needs a `prompt` or a `messages` column, has {table.column_names}"
        )
    for n, row in enumerate(table.select(columns).to_pylist()):
        yield f"{path.name}[{n}]", row


READERS = {".jsonl": _jsonl_rows, ".json": _jsonl_rows, ".parquet": _parquet_rows}


def load_prompts(path: Path) -> list[common_pb2.Prompt]:
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path.name}: unsupported prompt file type; use one of {sorted(READERS)}")
    prompts = [prompt_from_row(row, where) for where, row in reader(path)]
    if not prompts:
        raise ValueError(f"{path.name}: no prompts")
    return prompts
