"""The shape of the tree: a service package imports only `services.common` and the generated
`services.genproto`, never another service's package; every service starts as
`python -m services.<name>`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "services"
SHARED = {"common", "genproto"}


def _find_packages() -> list[str]:
    return sorted(
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and (p / "__init__.py").exists() and p.name not in SHARED
    )


def _imported(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """Every absolute module name a file imports, relative imports resolved against `module`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return out


PACKAGES = _find_packages()


def _crossings(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for line, name in _imported(ast.parse(path.read_text(), str(path)), module):
            target = name.split(".")
            crosses = len(target) >= 2 and target[0] == "services" and target[1] != package
            if crosses and target[1] not in SHARED and target[1] in PACKAGES:
                found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    return found


def test_the_walk_finds_a_crossing(tmp_path):
    """The check itself: an import of another package, plain or relative, is seen."""
    tree = ast.parse("from services.curator.join import x\nfrom ..reward import rpc\n")
    names = [n for _, n in _imported(tree, "services.gateway.events")]
    assert "services.curator.join" in names and "services.reward.rpc" in names


def test_services_import_only_common_and_genproto():
    packages = PACKAGES
    assert {"policy", "reward", "reference", "trainer", "curator", "gateway"} <= set(packages)
    crossings = [c for package in packages for c in _crossings(package)]
    assert crossings == [], "\n".join(crossings)


def test_services_common_imports_no_service():
    found = []
    for path in sorted((ROOT / "common").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        for line, name in _imported(ast.parse(path.read_text()), module):
            target = name.split(".")
            if len(target) >= 2 and target[0] == "services" and target[1] in PACKAGES:
                found.append(f"{path.relative_to(ROOT.parent)}:{line} imports {name}")
    assert found == [], "\n".join(found)


PROCESSES = [
    "policy",
    "reward",
    "reference",
    "rollout",
    "trainer",
    "gateway",
    "curator",
    "refresh",
    "judge",
]


def test_every_process_starts_as_python_m_services_name():
    for name in PROCESSES:
        assert (ROOT / name / "__main__.py").is_file(), name
    assert sorted(p.parent.name for p in ROOT.glob("*/__main__.py")) == sorted(PROCESSES)


def _main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("RLHF_")} | (env or {}),
    )


def test_an_unknown_argument_is_a_usage_error_and_starts_nothing():
    done = _main("services.reward", "serve-now")
    assert done.returncode == 2
    assert "usage: python -m services.reward [repository]" in done.stderr
    done = _main("services.curator", "--port", "1")
    assert done.returncode == 2 and "usage: python -m services.curator" in done.stderr


def test_the_repository_command_runs_through_main(tmp_path):
    done = _main(
        "services.reference", "repository", env={"RLHF_REFERENCE_MODEL_DIR": str(tmp_path)}
    )
    assert done.returncode == 2, done.stderr
    assert "RLHF_REFERENCE_MODEL_REPOSITORY is not set" in done.stderr
