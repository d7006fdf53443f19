"""A daemon process with a pid file: start detached, wait for readiness, stop by process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port that nothing listens on right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class Daemon:
    """One background process owned through `<state>/<name>.pid`.

    The process gets its own session, so stopping it signals its whole process group (Triton's
    Python-backend stubs included) and nothing is left behind.
    """

    def __init__(self, name: str, state_dir: Path):
        self.name = name
        self.state_dir = Path(state_dir)
        self.pid_file = self.state_dir / f"{name}.pid"
        self.log_file = self.state_dir / f"{name}.log"

    @property
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid) else None

    def start(
        self, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        if self.pid is not None:
            raise RuntimeError(f"{self.name} already runs as pid {self.pid} ({self.pid_file})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{proc.pid}\n")
        self._popen = proc  # keeps the child reapable by this process
        return proc.pid

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.pid is None:
                raise RuntimeError(f"{self.name} exited during start-up; log:\n{self.tail_log()}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001, S110 - any failure to answer means "not yet"
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f}s; log:\n{self.tail_log()}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM to the process group, SIGKILL after `timeout_s`. True if something ran."""
        pid = self.pid
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _group_alive(pid):
            self._reap()
            time.sleep(0.2)
        if _group_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _group_alive(pid):
                self._reap()
                time.sleep(0.1)
        self._reap()
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the whole group at once (crash tests)."""
        pid = self.pid
        if pid is not None:
            _signal_group(pid, signal.SIGKILL)
            while _group_alive(pid):
                self._reap()
                time.sleep(0.05)
            self._reap()
        self.pid_file.unlink(missing_ok=True)

    def tail_log(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def _reap(self) -> None:
        popen = getattr(self, "_popen", None)
        if popen is not None:
            popen.poll()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().split(")")[-1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # fields: state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
