"""Background load for the benchmarks and the chaos suite: threads that keep calling something
until stopped, as a context manager.

    class Pingers(Workers):
        def work(self, n: int) -> None:          # thread n; loops until `self.stopping` is set
            while not self.stopping.is_set():
                ...

    with Pingers(threads=3) as pingers:          # threads start here
        ...
    # stopped and joined here; `close()` then releases what the subclass opened
"""

from __future__ import annotations

import threading
from typing import Self


class Workers:
    """`threads` threads running `work(n)`; `stop()` (or leaving the `with`) ends them."""

    def __init__(self, threads: int = 1, join_timeout_s: float = 60.0):
        self.stopping = threading.Event()
        self.join_timeout_s = join_timeout_s
        self._threads = [
            threading.Thread(target=self.work, args=(n,), daemon=True) for n in range(threads)
        ]

    def work(self, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the subclass opened (a producer, a consumer), after the threads end."""

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=self.join_timeout_s)
        self.close()

    def __exit__(self, *_exc) -> None:
        self.stop()
