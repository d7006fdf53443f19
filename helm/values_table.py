"""The values table of the chart's README, generated from the comments in values.yaml.

Every key in values.yaml carries a comment on the line(s) right above it (a leading `-- ` is
dropped, as helm-docs writes them). The table has a row per leaf: its dotted path, its default
and that comment. The README holds it between two markers:

    <!-- values-table:begin -->
    ...
    <!-- values-table:end -->

    python helm/values_table.py           # rewrites the table in helm/rlhf-platform/README.md
    python helm/values_table.py --check   # exits 1 when a key has no comment or the table is stale

A key whose value is a flow collection (`{cpu: 250m}`, `[]`) or a block list is one leaf.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "rlhf-platform"
BEGIN = "<!-- values-table:begin -->"
END = "<!-- values-table:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?P<rest>.*)$")


@dataclass(frozen=True)
class Key:
    path: tuple[str, ...]
    line: int
    comment: str


def scan(text: str) -> list[Key]:
    """Every mapping key of a values file with its path and the comment block above it."""
    lines = text.splitlines()
    keys: list[Key] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    comment: list[str] = []
    i = 0
    while i < len(lines):
        line, number = lines[i], i + 1
        stripped = line.strip()
        i += 1
        if not stripped:
            comment = []
            continue
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line)
        if not match:
            raise ValueError(f"values.yaml:{number}: not a `key: value` line: {line!r}")
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = tuple(k for _, k in stack) + (match["key"],)
        joined = " ".join(c for c in comment if c)
        keys.append(Key(path, number, re.sub(r"^-- ", "", joined)))
        comment = []
        if match["rest"].split("#")[0].strip():
            continue  # a scalar or flow value on the line: a leaf
        following = next((x for x in lines[i:] if x.strip() and not _is_comment(x)), "")
        if following.strip().startswith("- "):
            # A block list is one leaf: skip its items (deeper lines, or `- ` at its indent).
            while i < len(lines) and (
                not lines[i].strip()
                or _indent(lines[i]) > indent
                or lines[i].strip().startswith("- ")
            ):
                i += 1
        else:
            stack.append((indent, match["key"]))
    return keys


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_comment(line: str) -> bool:
    return line.strip().startswith("#")


def leaves(keys: list[Key]) -> list[Key]:
    """Keys that open no mapping of their own (their value is one cell of the table)."""
    parents = {k.path[:-1] for k in keys}
    return [k for k in keys if k.path not in parents]


def value_at(values: dict, path: tuple[str, ...]):
    node = values
    for part in path:
        node = node[part]
    return node


def default_text(value) -> str:
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000)
        return text.strip()
    return json.dumps(value)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(values_text: str) -> str:
    keys = scan(values_text)
    values = yaml.safe_load(values_text)
    rows = ["| value | default | meaning |", "| --- | --- | --- |"]
    for key in leaves(keys):
        default = default_text(value_at(values, key.path))
        rows.append(f"| `{'.'.join(key.path)}` | `{cell(default)}` | {cell(key.comment)} |")
    return "\n".join(rows)


def problems(values_text: str) -> list[str]:
    """Keys without a comment, and PyYAML leaves the scan did not see (a layout it misreads)."""
    keys = scan(values_text)
    found = [f"line {k.line}: `{'.'.join(k.path)}` has no comment" for k in keys if not k.comment]
    seen = {k.path for k in keys}
    values = yaml.safe_load(values_text)

    def walk(node, path):
        if isinstance(node, dict) and node and path + (next(iter(node)),) in seen:
            for name, child in node.items():
                walk(child, path + (name,))
        elif path not in seen:
            found.append(f"`{'.'.join(path)}` was not read from the file's lines")

    for name, child in values.items():
        walk(child, (name,))
    return found


def render_readme(readme: str, values_text: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"README lacks the markers {BEGIN} / {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(values_text)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when stale, do not write")
    parser.add_argument("--chart", type=Path, default=CHART, help="chart folder")
    opts = parser.parse_args(argv)
    values_text = (opts.chart / "values.yaml").read_text()
    readme_path = opts.chart / "README.md"
    found = problems(values_text)
    if found:
        print("values.yaml:\n  " + "\n  ".join(found), file=sys.stderr)
        return 1
    readme = readme_path.read_text()
    wanted = render_readme(readme, values_text)
    if opts.check:
        if wanted != readme:
            print(
                f"{readme_path}: the values table is stale; run python helm/values_table.py",
                file=sys.stderr,
            )
            return 1
        return 0
    readme_path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
