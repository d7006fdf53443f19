"""Peak resident memory of a benchmark and of every process it starts, for its result JSON.

    from bench.memory import PeakRss

    with PeakRss() as rss:          # a daemon thread samples every interval_s
        ...                         # start Triton, the services, Kafka, the trainer...
    rss.peaks_mb()                  # {"bench.generation": 512.0, "tritonserver": 1350.2, ...}

`bench.run` starts one process-wide sampler when a benchmark imports it, and `write_result`
puts its `peak_rss_mb` into every result, so no benchmark has to remember to.

Why sampling: a child's own peak (`ru_maxrss`) is only readable by the child, or by its parent
once it has been waited for, and most of what a benchmark starts (Triton and its Python-backend
stubs, Kafka's JVM, services killed at the end) is never waited for by the bench process. So a
thread walks this process's descendants every `interval_s` and keeps the largest RSS seen for
each role; a process that lives less than one interval can be missed. This process's own figure
is the exact kernel peak (`ru_maxrss`) when that is larger than what was sampled.

Roles are readable names, stable from run to run: the `RLHF_BENCH_ROLE` environment variable
when it was set for this process (its parent has another value or none; a descendant that
inherited it is `<that role> / <its own>`), else `-m module`
(plus the first positional argument, so `services.cli sft` differs from `services.cli rl`) for
Python, the main class for Java (`kafka.Kafka`), the model for a Triton Python-backend stub
(`triton_python_backend_stub:policy-1`), and the executable's name otherwise. Processes that
share a role (two policy replicas, repeated runs) share one entry, the largest of them;
`processes` counts the distinct processes behind each entry.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path
from typing import Self

import psutil

ROLE_ENV = "RLHF_BENCH_ROLE"
MB = 1024 * 1024


def role_of_cmdline(cmdline: list[str], name: str = "") -> str:
    """A readable role from a command line (see the module docstring)."""
    if not cmdline:
        return name or "?"
    exe = Path(cmdline[0]).name
    args = cmdline[1:]
    if exe.startswith("python") or exe == "pytest":
        if "-m" in args and args.index("-m") + 1 < len(args):
            at = args.index("-m") + 1
            rest = [a for a in args[at + 1 :] if not a.startswith("-")]
            # `services.cli sft`: the subcommand is the role; an option's value is not.
            if rest and args[at + 1] == rest[0]:
                return f"{args[at]} {rest[0]}"
            return args[at]
        if "-c" in args:
            code = " ".join(args[args.index("-c") + 1 :])
            for mark in ("spawn_main", "forkserver", "resource_tracker"):
                if mark in code:  # multiprocessing's helper processes
                    return f"multiprocessing {mark}"
            return f"{exe} -c"
        scripts = [a for a in args if not a.startswith("-")]
        return Path(scripts[0]).name if scripts else exe
    if exe == "java":
        # The main class is the first argument after the options (-cp takes a value).
        skip = False
        for arg in args:
            if skip:
                skip = False
            elif arg in ("-cp", "-classpath", "--class-path"):
                skip = True
            elif not arg.startswith("-"):
                return arg
        return exe
    if exe == "triton_python_backend_stub" and args:
        # argv[1] is the model's file: <repository>/<model>/<version>/model.py
        parts = Path(args[0]).parts
        return f"{exe}:{parts[-3]}" if len(parts) >= 3 else exe
    return exe or name or "?"


def role_of(process: psutil.Process) -> str | None:
    """The process's role; None when it is gone before its role could be read."""
    try:
        derived = role_of_cmdline(process.cmdline(), process.name())
        own = process.environ().get(ROLE_ENV)
        if own:
            parent = process.parent()
            inherited = parent.environ().get(ROLE_ENV) if parent else None
            # Set by this process's starter for it, or inherited from a named ancestor.
            return own if own != inherited else f"{own} / {derived}"
        return derived
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class PeakRss:
    """Largest RSS per role of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.samples = 0
        self._me = psutil.Process()
        self._roles: dict[tuple[int, float], str] = {}  # (pid, create_time) -> role
        self._peaks: dict[str, int] = {}  # role -> bytes
        self._total_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._thread is None:
            self.sample()
            self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """One walk of the tree: every live process's RSS against its role's peak."""
        try:
            processes = [self._me, *self._me.children(recursive=True)]
        except psutil.Error:
            return
        total = 0
        with self._lock:
            for process in processes:
                try:
                    key = (process.pid, process.create_time())
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue  # it exited between the walk and the read
                if key not in self._roles:
                    role = role_of(process)
                    if role is None:
                        continue  # exited meanwhile; a live one is read again next time
                    self._roles[key] = role
                role = self._roles[key]
                self._peaks[role] = max(self._peaks.get(role, 0), rss)
                total += rss
            self._total_peak = max(self._total_peak, total)
            self.samples += 1

    def peaks_mb(self) -> dict[str, float]:
        """{role: peak RSS in MB}, largest first; this process's entry includes `ru_maxrss`."""
        self.sample()
        with self._lock:
            peaks = dict(self._peaks)
            mine = self._roles.get((self._me.pid, self._me.create_time()))
        if mine is not None:
            # Linux reports ru_maxrss in KiB: the kernel's own peak, between samples included.
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            peaks[mine] = max(peaks[mine], own)
        return {
            role: round(rss / MB, 1)
            for role, rss in sorted(peaks.items(), key=lambda item: -item[1])
        }

    def summary(self) -> dict:
        """How the peaks were taken, for the result beside them."""
        with self._lock:
            processes: dict[str, int] = {}
            for role in self._roles.values():
                processes[role] = processes.get(role, 0) + 1
            return {
                "interval_s": self.interval_s,
                "samples": self.samples,
                "total_peak_mb": round(self._total_peak / MB, 1),
                "processes": processes,
                "pid": os.getpid(),
                "sampled_until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }


_process_sampler: PeakRss | None = None
_process_lock = threading.Lock()


def process_sampler() -> PeakRss:
    """The one sampler of this process, started on first use (bench.run does at import)."""
    global _process_sampler
    with _process_lock:
        if _process_sampler is None or _process_sampler._me.pid != os.getpid():
            _process_sampler = PeakRss().start()  # a fresh one after a fork
        return _process_sampler
