"""The `rlhf` command line: the offline training stages and the evaluation.

    python -m services.cli sft          --model M --data demos.jsonl --output runs/sft-1
    python -m services.cli train-reward --data preferences.jsonl --output runs/rm-1
    python -m services.cli dpo          --model runs/sft-1 --data preferences.jsonl --output runs/dpo-1
    python -m services.cli kto          --model runs/sft-1 --data thumbs.jsonl --output runs/kto-1
    python -m services.cli dpo --config dpo.yaml --set beta=0.2 --set epochs=3
    python -m services.cli eval         --candidate runs/dpo-1 --baseline runs/sft-1 \
                                        --data prompts.jsonl --output runs/eval-1
    python -m services.cli export       --output runs/export-1 --format parquet
    python -m services.cli cai-sft      --policy localhost:50051 --prompts red_team.jsonl \
                                        --constitution v1.yaml --output cai.jsonl --seed 0
    python -m services.cli label-ai     --judge localhost:50054 --data pairs.jsonl --output v.jsonl
    python -m services.cli judge                  (serves the JudgeService, RLHF_JUDGE_* settings)
    python -m services.cli topics ensure          (or `topics check`)
    python -m services.cli schema                 (prints the protobuf descriptor set's path)

A stage's settings are its config dataclass (services/common/training/<stage>.py; for eval,
services/eval/run.py): defaults, then the YAML file (keys are the field names), then the flags,
then each `--set FIELD=VALUE`.
`python -m services.cli <stage> --help` lists every field with its one-line description.
Exit status: 0 done (the summary is printed as JSON), 2 bad data or configuration (the reason
on stderr, naming file/row/column or field), 1 anything else.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import itertools
import json
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
PATH_FLAGS = ("model", "data", "eval_data", "output")


@dataclass(frozen=True)
class Stage:
    module: str
    """Module holding the stage."""
    config: str
    """Name of its config dataclass."""
    run: str
    """Name of its run function: config -> summary dict."""
    help: str
    flags: tuple[str, ...] = PATH_FLAGS
    """Config fields that get a --flag of their own (every field can be given with --set)."""


STAGES: dict[str, Stage] = {
    "sft": Stage(
        "services.common.training.sft",
        "SFTConfig",
        "run_sft",
        "supervised fine-tuning on demonstrations",
    ),
    "train-reward": Stage(
        "services.common.training.reward",
        "RewardConfig",
        "run_train_reward",
        "Bradley-Terry reward model on pairs and rankings",
    ),
    "dpo": Stage(
        "services.common.training.dpo",
        "DPOConfig",
        "run_dpo",
        "direct preference optimisation on pairs",
    ),
    "kto": Stage(
        "services.common.training.kto", "KTOConfig", "run_kto", "KTO on thumbs-up/down labels"
    ),
    "eval": Stage(
        "services.eval.run",
        "EvalConfig",
        "run_eval",
        "win-rate of a candidate policy over a baseline, judged pairwise",
        flags=("candidate", "baseline", "reference", "data", "output", "annotator", "judge"),
    ),
    "export": Stage(
        "services.export.run",
        "ExportConfig",
        "run_export",
        "collected preferences and thumbs out to JSONL/Parquet in TRL's columns",
        flags=("output", "bootstrap_servers", "format", "since", "until"),
    ),
    "cai-sft": Stage(
        "services.judge.cai",
        "CaiSftConfig",
        "run_cai_sft",
        "Constitutional AI SFT data: the policy answers, critiques and revises by a principle",
        flags=("policy", "prompts", "constitution", "output", "seed"),
    ),
    "label-ai": Stage(
        "services.judge.label_file",
        "LabelAiConfig",
        "run_label_ai",
        "AI labels for a JSONL file of answer pairs from a running JudgeService",
        flags=("judge", "data", "output"),
    ),
}


def topics_command(options: argparse.Namespace) -> int:
    """`rlhf topics ensure|check`: the topics of services/common/topics.py on the cluster of
    RLHF_KAFKA_BOOTSTRAP_SERVERS (or --bootstrap-servers); exit 1 when any differs."""
    from services.common.kafka import check_topics, ensure_topics
    from services.common.settings import KafkaSettings
    from services.common.topics import TOPICS

    kafka = (
        KafkaSettings(bootstrap_servers=options.bootstrap_servers)
        if options.bootstrap_servers
        else KafkaSettings()
    )
    created = []
    if options.action == "ensure":
        created = ensure_topics(kafka, TOPICS, options.replication_factor)
    problems = check_topics(kafka, TOPICS)
    print(
        json.dumps(
            {
                "bootstrap_servers": kafka.bootstrap_servers,
                "created": created,
                "topics": [t.name for t in TOPICS],
                "problems": problems,
            },
            indent=2,
        )
    )
    for line in problems:
        print(f"rlhf topics: {line}", file=sys.stderr)
    return 1 if problems else 0


def schema_command(options: argparse.Namespace) -> int:
    """`rlhf schema`: the path of the FileDescriptorSet that decodes every topic's records."""
    from services.common.schema import descriptor_set_path

    print(descriptor_set_path())
    return 0


def judge_command(options: argparse.Namespace) -> int:
    """`rlhf judge`: serves the JudgeService (services/judge/server.py) with its settings from
    RLHF_JUDGE_* until SIGTERM; RLHF_JUDGE_ANNOTATOR=module:function for the rule-based judge."""
    from services.judge.server import JudgeService

    JudgeService.serve()
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The operations commands beside the stages."""
    sub = commands.add_parser(
        "topics",
        help="create the platform's Kafka topics and check the existing ones",
        description=topics_command.__doc__,
    )
    sub.add_argument("action", choices=("ensure", "check"), help="ensure: create what is missing")
    sub.add_argument("--bootstrap-servers", default="", help="host:port[,host:port]")
    sub.add_argument(
        "--replication-factor", type=int, default=None, help="default: min(3, brokers)"
    )
    sub.set_defaults(_command=topics_command)
    sub = commands.add_parser(
        "schema",
        help="print the path of the protobuf descriptor set of the Kafka records",
        description=schema_command.__doc__,
    )
    sub.set_defaults(_command=schema_command)
    sub = commands.add_parser(
        "judge",
        help="serve the AI judge (RLAIF, Constitutional AI) over gRPC",
        description=judge_command.__doc__,
    )
    sub.set_defaults(_command=judge_command)


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring under it, for every dataclass in the class's MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = following.value.value.strip()
    return docs


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError


def _to_number(kind: type) -> Any:
    def convert(value: Any):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        if kind is int and isinstance(value, float):
            raise ValueError
        return kind(value)

    return convert


def _to_text(kind: type) -> Any:
    def convert(value: Any):
        if not isinstance(value, (str, Path)):
            raise TypeError
        return kind(value)

    return convert


# YAML gives typed values, the command line strings: each field type converts both or refuses.
CONVERTERS = {
    bool: _to_bool,
    int: _to_number(int),
    float: _to_number(float),
    str: _to_text(str),
    Path: _to_text(Path),
}


def coerce(name: str, hint: Any, value: Any) -> Any:
    """A YAML or command-line value as the field's type; ConfigError naming the field otherwise."""
    from services.common.training.stage import ConfigError

    is_union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if is_union else (hint,)
    if value is None and type(None) in options:
        return None
    target = next(t for t in options if t is not type(None))
    try:
        return CONVERTERS[target](value)
    except (TypeError, ValueError):
        message = f"config field '{name}' must be {target.__name__}, got {value!r}"
        raise ConfigError(message) from None


def build_config(cls: type, yaml_file: Path | None, flags: dict[str, Any], overrides: list[str]):
    """defaults < YAML < flags < --set, checked against the dataclass's fields."""
    import yaml

    from services.common.training.stage import ConfigError

    values: dict[str, Any] = {}
    if yaml_file is not None:
        try:
            loaded = yaml.safe_load(Path(yaml_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"config file {yaml_file}: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {yaml_file}: expected a mapping of field: value")
        values |= loaded
    values |= {k: v for k, v in flags.items() if v is not None}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"--set {override!r}: expected FIELD=VALUE")
        values[key.strip().replace("-", "_")] = value
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known: {sorted(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"missing config field(s) {missing} (give them as --flags or in --config)"
        )
    return cls(**{name: coerce(name, hints[name], value) for name, value in values.items()})


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Offline RLHF training stages, evaluation, data export and operations.",
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="COMMAND")
    for name, stage in STAGES.items():
        sub = stages.add_parser(
            name,
            help=stage.help,
            description=stage.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", type=Path, help="YAML file of config fields (see below)")
        for flag in stage.flags:
            sub.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=f"config field {flag}")
        sub.add_argument(
            "--set", action="append", default=[], metavar="FIELD=VALUE", help="set any config field"
        )
        sub.set_defaults(_stage=stage)
    add_commands(stages)
    return parser


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return f"{f.default_factory.__name__}()"
    return "(required)"


def _with_field_help(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Adds the chosen stage's fields and their docstrings to its --help."""
    if len(argv) >= 2 and argv[0] in STAGES and ("-h" in argv or "--help" in argv):
        stage = STAGES[argv[0]]
        cls = getattr(importlib.import_module(stage.module), stage.config)
        defaults = {f.name: _default_text(f) for f in dataclasses.fields(cls)}
        lines = [
            f"  {name} = {defaults[name]}\n      {doc}" for name, doc in field_docs(cls).items()
        ]
        stages = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        stages.choices[argv[0]].epilog = "config fields:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser()
    _with_field_help(parser, argv)
    options = parser.parse_args(argv)
    if hasattr(options, "_command"):
        return options._command(options)
    stage: Stage = options._stage
    module = importlib.import_module(stage.module)
    from services.common.training.data import DataError
    from services.common.training.stage import ConfigError
    from services.eval.run import EvalError
    from services.export.run import ExportError

    try:
        config = build_config(
            getattr(module, stage.config),
            options.config,
            {f: getattr(options, f) for f in stage.flags},
            options.set,
        )
        summary = getattr(module, stage.run)(config)
    except (ConfigError, DataError, EvalError, ExportError) as err:
        print(f"rlhf {options.stage}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        json.dumps(
            {"output": str(config.output), "metrics": summary["metrics"]}, indent=2, sort_keys=True
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
