"""Serving the reward-model version the publisher names, even after a missed ReloadModel.

The refresh writes `<versions_root>/CURRENT` before it sends ReloadModel to every replica. A
replica that was restarting, or is new, misses that call and would score with its start-up
folder; `PublishedFollower` reads CURRENT once before the service takes traffic and then every
`interval_s`, and reloads through the same checks as ReloadModel (checksums, tensor shapes,
newer version only). A version the model refused is not tried again.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from services.common.versions import read_published
from services.reward.scorer import RewardScorer

log = logging.getLogger(__name__)


class PublishedFollower:
    def __init__(self, root: Path, scorer: RewardScorer, served_version: int, interval_s: float):
        self.root = Path(root)
        self.scorer = scorer
        self.served = served_version
        self.interval_s = interval_s
        self.refused: set[int] = set()
        self.reloads = 0
        """Reloads asked of the model (accepted or refused)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reward-follower", daemon=True)

    def sync(self) -> int:
        """Reloads the published version when it is newer than the served one; returns the served."""
        try:
            published = read_published(self.root)
        except (OSError, ValueError, KeyError) as exc:
            log.warning(
                "unreadable CURRENT", extra={"fields": {"root": str(self.root), "error": repr(exc)}}
            )
            return self.served
        if (
            published is None
            or published.version <= self.served
            or published.version in self.refused
        ):
            return self.served
        self.reloads += 1
        result = self.scorer.reload(published.version, str(published.path), published.file_sha256)
        if result.accepted or result.version >= published.version:  # a ReloadModel got there first
            log.info(
                "serving the published reward model", extra={"fields": {"version": result.version}}
            )
        else:
            self.refused.add(published.version)
            log.error(
                "published reward model refused",
                extra={"fields": {"version": published.version, "reason": result.reason}},
            )
        self.served = max(self.served, result.version)
        return self.served

    def start(self) -> PublishedFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except Exception:  # Triton busy or restarting: try again at the next interval
                log.exception("following the published reward model failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
