"""bench/memory.py: the peak RSS of every process a benchmark starts, by role, and
`write_result` putting it into every result JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from bench.memory import ROLE_ENV, PeakRss, role_of_cmdline
from bench.run import write_result

# A child that holds `mb` MB of written pages (bytes filled with 1s: no lazily mapped zero
# pages) until told to stop, then exits.
HOLDER = textwrap.dedent(
    """
    import sys
    block = b"\\x01" * ({mb} << 20)
    print("holding", flush=True)
    sys.stdin.readline()
    """
)


def hold(mb: int, role: str | None = None, grandchild: bool = False) -> subprocess.Popen:
    env = {**os.environ}
    env.pop(ROLE_ENV, None)
    if role:
        env[ROLE_ENV] = role
    code = HOLDER.format(mb=mb)
    if grandchild:
        # The holder two levels down, under a parent that holds almost nothing.
        code = (
            "import subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-c', {code!r}], stdin=sys.stdin)\n"
            "p.wait()\n"
        )
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    return child


def wait_holding(child: subprocess.Popen, rss: PeakRss) -> None:
    assert child.stdout.readline().strip() == b"holding"
    time.sleep(3 * rss.interval_s)  # a few samples while it holds the block


def release(child: subprocess.Popen) -> None:
    child.stdin.write(b"\n")
    child.stdin.close()
    child.wait(timeout=30)


def test_a_child_holding_a_known_amount_shows_at_least_that_under_its_role():
    with PeakRss(interval_s=0.05) as rss:
        child = hold(150, role="holder")
        try:
            wait_holding(child, rss)
        finally:
            release(child)
    peaks = rss.peaks_mb()
    assert peaks["holder"] >= 150
    # This process is there too, under its own role, and far below the child's figure.
    mine = role_of_cmdline(psutil.Process().cmdline())
    assert mine in peaks and mine != "holder"
    assert rss.summary()["processes"]["holder"] == 1
    assert rss.summary()["total_peak_mb"] >= 150 + peaks[mine] * 0.5


def test_grandchildren_count_and_the_peak_outlives_the_process():
    with PeakRss(interval_s=0.05) as rss:
        child = hold(120, role="holder-tree", grandchild=True)
        try:
            wait_holding(child, rss)
        finally:
            release(child)
        time.sleep(0.2)  # both are gone now; their peak stays
    peaks = rss.peaks_mb()
    # The role is the one its top process was given; the grandchild inherited the same value
    # and is named under it by its command line.
    assert peaks["holder-tree"] < 100
    assert peaks[f"holder-tree / {role_of_cmdline([sys.executable, '-c', '...'])}"] >= 120


def test_processes_sharing_a_role_share_one_entry_the_largest():
    with PeakRss(interval_s=0.05) as rss:
        small, large = hold(40, role="replica"), hold(130, role="replica")
        try:
            wait_holding(small, rss)
            wait_holding(large, rss)
        finally:
            release(small)
            release(large)
    assert rss.peaks_mb()["replica"] >= 130
    assert rss.summary()["processes"]["replica"] == 2


@pytest.mark.parametrize(
    ("cmdline", "role"),
    [
        (["/venv/bin/python", "-m", "services.policy"], "services.policy"),
        (["python3.11", "-u", "-m", "services.cli", "sft", "--config", "x"], "services.cli sft"),
        (["python", "-m", "bench.trainer_vs_trl", "--worker", "ours"], "bench.trainer_vs_trl"),
        (
            ["/usr/bin/java", "-Xmx1G", "-cp", "/libs/*", "kafka.Kafka", "s.properties"],
            "kafka.Kafka",
        ),
        (
            ["/x/backends/python/triton_python_backend_stub", "/repo/policy-7/1/model.py", "shm"],
            "triton_python_backend_stub:policy-7",
        ),
        (["/opt/tritonserver/bin/tritonserver", "--model-repository=/r"], "tritonserver"),
        (["python", "bench/soak.py"], "soak.py"),
        (
            ["python", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(fd=5)"],
            "multiprocessing spawn_main",
        ),
        ([], "?"),
    ],
)
def test_roles_are_readable_names_from_the_command_line(cmdline, role):
    assert role_of_cmdline(cmdline) == role


def test_write_result_adds_peak_rss_by_role_and_keeps_a_benchmarks_own(tmp_path):
    child = hold(100, role="written-child")
    try:
        assert child.stdout.readline().strip() == b"holding"
        time.sleep(1.0)  # the process-wide sampler samples every 0.25 s
    finally:
        release(child)
    path = write_result("x", {"figure": 1.5, "peak_rss_mb": {"a": [1, 2]}}, tmp_path / "x.json")
    written = json.loads(path.read_text())
    assert written["figure"] == 1.5
    assert written["peak_rss_mb_bench"] == {"a": [1, 2]}  # not {role: MB}: kept aside
    assert written["peak_rss_mb"]["written-child"] >= 100
    assert all(isinstance(v, float) for v in written["peak_rss_mb"].values())
    assert written["peak_rss_sampling"]["samples"] >= 2


def test_peaks_a_benchmark_collected_elsewhere_are_merged(tmp_path):
    outside = {"services: tritonserver": 1234.5, "written-child": 1.0}
    path = write_result("x", {"peak_rss_mb": outside}, tmp_path / "x.json")
    peaks = json.loads(path.read_text())["peak_rss_mb"]
    assert peaks["services: tritonserver"] == 1234.5
    assert peaks["written-child"] >= 100  # the larger of the two figures of one role
    assert list(peaks.values()) == sorted(peaks.values(), reverse=True)
