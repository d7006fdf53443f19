"""`rlhf label-ai`: AI labels for a file of answer pairs, from a running JudgeService.

    python -m services.cli label-ai --judge localhost:50054 --data pairs.jsonl \
        --output runs/ai-labels.jsonl [--set publish=false]

1. Check every row: {"prompt": text} or {"messages": [...]}, with "answer_a" and "answer_b"
   (and optionally "response_id_a" / "response_id_b").
2. Send them to the judge in batches of `batch_size` pairs (Compare, `publish` as configured:
   with it, every verdict that is not a tie is on rlhf.preferences.v1 when the call returns).
3. Write one verdict per row, atomically: the row's answers, p_a_better, confidence, both
   orders' probabilities and the published preference_id. The summary adds the judge's
   position bias, mean(p_a_first + p_b_first - 1) (0 for a judge blind to the order), and the
   pairs on which both orders agree.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.training.data import DataError, read_rows
from services.common.training.stage import ConfigError
from services.genproto.rlhf.v1 import judge_pb2, judge_pb2_grpc
from services.judge.cai import parse_prompt, policy_target, wire_prompt


@dataclass(kw_only=True)
class LabelAiConfig:
    judge: str
    """The JudgeService: host:port (or grpc://host:port)."""
    data: Path
    """JSONL of pairs: prompt (or messages), answer_a, answer_b[, response_id_a, response_id_b]."""
    output: Path
    """JSONL file of the verdicts, one per row (written atomically)."""
    publish: bool = True
    """Publish each verdict that is not a tie to rlhf.preferences.v1 (source AI)."""
    batch_size: int = 16
    """Pairs per Compare request."""
    timeout_s: float = 600.0
    """Deadline of one Compare request."""


def load_pairs(path: Path) -> list[tuple[dict, judge_pb2.JudgedPair]]:
    pairs = []
    for where, row in read_rows(path):
        messages = parse_prompt({k: row[k] for k in ("prompt", "messages") if k in row}, where)
        answers = {}
        for column in ("answer_a", "answer_b"):
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: column '{column}' must be a non-empty string")
            answers[column] = value
        ids = {c: str(row.get(c) or "") for c in ("response_id_a", "response_id_b")}
        wire = judge_pb2.JudgedPair(prompt=wire_prompt(messages), **answers, **ids)
        pairs.append((row, wire))
    if not pairs:
        raise DataError(f"{path}: holds no pairs")
    return pairs


def run_label_ai(config: LabelAiConfig) -> dict:
    if config.batch_size < 1:
        raise ConfigError(f"config field 'batch_size' has an invalid value {config.batch_size!r}")
    target = policy_target("judge", config.judge)
    pairs = load_pairs(config.data)  # 1
    channel = grpc.insecure_channel(target)
    stub = judge_pb2_grpc.JudgeServiceStub(channel)
    out, judge_model, rubric_version, published = [], "", "", 0
    try:
        for start in range(0, len(pairs), config.batch_size):  # 2
            batch = pairs[start : start + config.batch_size]
            request = judge_pb2.CompareRequest(pairs=[w for _, w in batch], publish=config.publish)
            try:
                response = stub.Compare(request, timeout=config.timeout_s)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise DataError(f"{config.data}: the judge refused: {err.details()}") from err
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    raise ConfigError(
                        f"config field 'judge': no JudgeService at {config.judge}: {err.details()}"
                    ) from err
                raise
            judge_model, rubric_version = response.judge_model, response.rubric_version
            published += response.published
            for (row, wire), verdict in zip(batch, response.verdicts):
                out.append(
                    {
                        "prompt": row.get("prompt", row.get("messages")),
                        "answer_a": wire.answer_a,
                        "answer_b": wire.answer_b,
                        "p_a_better": verdict.p_a_better,
                        "confidence": verdict.confidence,
                        "p_a_first": verdict.p_a_first,
                        "p_b_first": verdict.p_b_first,
                        "preference_id": verdict.preference_id,
                        "judge_model": judge_model,
                        "rubric_version": rubric_version,
                    }
                )
    finally:
        channel.close()
    output = Path(config.output)  # 3
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
    os.replace(staging, output)
    return {
        "stage": "label-ai",
        "metrics": {
            "pairs": len(out),
            "published": published,
            "a_better": sum(1 for r in out if r["p_a_better"] > 0.5),
            "b_better": sum(1 for r in out if r["p_a_better"] < 0.5),
            "ties": sum(1 for r in out if r["p_a_better"] == 0.5),
            "confidence_mean": statistics.fmean(r["confidence"] for r in out),
            # > 0: the judge favours the answer shown first (0 for a position-blind judge).
            "position_bias_mean": statistics.fmean(
                r["p_a_first"] + r["p_b_first"] - 1 for r in out
            ),
            # Pairs where both orders prefer the same answer.
            "orders_agree": sum((r["p_a_first"] - 0.5) * (r["p_b_first"] - 0.5) < 0 for r in out),
            "judge_model": judge_model,
            "rubric_version": rubric_version,
        },
    }
