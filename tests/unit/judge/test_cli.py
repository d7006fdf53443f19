"""`rlhf judge`, `rlhf cai-sft` and `rlhf label-ai` are registered, with their flags."""

from __future__ import annotations

from pathlib import Path

from services.cli import STAGES, build_config, make_parser
from services.judge.cai import CaiSftConfig
from services.judge.label_file import LabelAiConfig


def test_commands_are_registered():
    parser = make_parser()
    options = parser.parse_args(["judge"])
    assert options._command.__name__ == "judge_command"
    options = parser.parse_args(
        ["cai-sft", "--policy", "h:1", "--prompts", "p.jsonl", "--output", "o.jsonl", "--seed", "4"]
    )
    assert options._stage is STAGES["cai-sft"]
    config = build_config(
        CaiSftConfig,
        None,
        {f: getattr(options, f) for f in options._stage.flags},
        ["max_new_tokens=8"],
    )
    assert (config.policy, config.prompts, config.output) == (
        "h:1",
        Path("p.jsonl"),
        Path("o.jsonl"),
    )
    assert (config.seed, config.max_new_tokens) == (4, 8)
    options = parser.parse_args(["label-ai", "--judge", "h:2", "--data", "d", "--output", "o"])
    config = build_config(
        LabelAiConfig,
        None,
        {f: getattr(options, f) for f in options._stage.flags},
        ["publish=false"],
    )
    assert config.judge == "h:2" and config.publish is False
