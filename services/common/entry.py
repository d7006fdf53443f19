"""The body of every `services/<name>/__main__.py`: `python -m services.<name>` runs the process;
a model service also takes `repository`, which writes its Triton model repository and exits (the
Helm chart's init container runs it). The settings come from the environment, never from argv."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(
    name: str, serve: Callable[[], object], commands: dict[str, Callable[[], int]] | None = None
) -> int:
    commands = commands or {}
    args = sys.argv[1:]
    if not args:
        serve()
        return 0
    if len(args) == 1 and args[0] in commands:
        return int(commands[args[0]]() or 0)
    choices = f" [{' | '.join(commands)}]" if commands else ""
    print(f"usage: python -m services.{name}{choices}", file=sys.stderr)
    print("settings are read from the environment (RLHF_*), not from arguments", file=sys.stderr)
    return 2
