"""The container images run the Python the tests run, and every locked package installs on it.

The Triton image once ran its Python backend on the 24.10 image's own Python 3.10, where the
lock's torch, transformers and pydantic-settings (Requires-Python >= 3.11) do not install; no
test ran the image build (there is no Docker engine here), so these checks read the Dockerfiles
and the installed packages' own metadata instead. The Triton server version is checked against
the server the tests run in tests/integration/test_triton_server.py."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SERVICES = (ROOT / "docker" / "services.Dockerfile").read_text()
TRITON = (ROOT / "docker" / "triton.Dockerfile").read_text()
TESTS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def arg(dockerfile: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", dockerfile, re.MULTILINE)
    assert match, f"no ARG {name}=... in the Dockerfile"
    return match.group(1)


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split(";")[0].split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def requires_python(name: str) -> SpecifierSet:
    return SpecifierSet(metadata.metadata(name).get("Requires-Python") or "")


def test_both_images_run_the_python_the_tests_run():
    assert re.findall(r"^FROM python:(\S+)-slim", SERVICES, re.MULTILINE) == [TESTS_PYTHON] * 2
    assert arg(TRITON, "PYTHON_VERSION") == TESTS_PYTHON
    assert "FROM python:${PYTHON_VERSION}-slim AS code" in TRITON
    # The Triton stage builds its venv with that Python and puts its stub in the backend folder.
    assert '"python${PYTHON_VERSION}" -m venv /opt/venv' in TRITON
    assert "python_backend_stubs/${PYTHON_VERSION}/triton_python_backend_stub" in TRITON


def test_every_locked_package_is_installed_and_accepts_the_images_python():
    pins = locked()
    assert len(pins) > 100
    refused = {}
    for name, version in pins.items():
        assert metadata.version(name) == version, (
            f"{name}: installed {metadata.version(name)}, locked {version}"
        )
        if TESTS_PYTHON + ".0" not in requires_python(name):
            refused[name] = str(requires_python(name))
    assert refused == {}


def test_the_image_python_check_would_refuse_310():
    """Against Python 3.10 (the 24.10 image's own) the same check refuses real locked packages."""
    too_new = {
        name
        for name in ("torch", "transformers", "pydantic-settings")
        if "3.10.0" not in requires_python(name)
    }
    assert too_new == {"torch", "transformers", "pydantic-settings"}


def test_the_pytriton_wheel_carries_the_stub_for_that_python():
    import pytriton

    stub = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / TESTS_PYTHON
    assert (stub / "triton_python_backend_stub").is_file()
