"""The refresh's durable state: a sqlite store of preference pairs (de-duplicated by id, split
into train and held-out), consumed positions per partition and the current published version.
See worker.py for the cycle it serves."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from services.common.durable import DurableStore
from services.common.training.data import PreferencePair

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The pair store: pairs, ids seen, offsets and the current version, in one sqlite file

SCHEMA = """
CREATE TABLE IF NOT EXISTS pairs (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, preference_id TEXT UNIQUE, prompt TEXT, chosen TEXT,
  rejected TEXT, held_out INTEGER, trained INTEGER DEFAULT 0, source TEXT DEFAULT 'human',
  cohort TEXT DEFAULT '');
CREATE INDEX IF NOT EXISTS pairs_split ON pairs(held_out, trained);
CREATE TABLE IF NOT EXISTS seen (preference_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT);
"""
ADDED_COLUMNS = {"source": "TEXT DEFAULT 'human'", "cohort": "TEXT DEFAULT ''"}
"""Columns a store written before them lacks; added on open (its pairs are human, no cohort)."""
PAIR_COLUMNS = "prompt, chosen, rejected, source, cohort"
"""PreferencePair's fields, in order."""


@dataclass(frozen=True)
class CurrentVersion:
    """The reward model the next refresh starts from (the last one published)."""

    version: int
    path: Path
    file_sha256: dict[str, str]
    reload_pending: bool
    """Published and recorded, but the reward service has not answered its reload yet."""


class PairStore(DurableStore):
    """Typed layer over the refresh's sqlite file."""

    def __init__(self, state_dir: Path):
        super().__init__(state_dir, "refresh.sqlite", SCHEMA)
        present = {row[1] for row in self.db.execute("PRAGMA table_info(pairs)")}
        for column, declaration in ADDED_COLUMNS.items():
            if column not in present:
                self.db.execute(f"ALTER TABLE pairs ADD COLUMN {column} {declaration}")
        self.db.commit()

    def mark_seen(self, preference_id: str) -> bool:
        """False when the id was stored before (a duplicate)."""
        return (
            self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (preference_id,)).rowcount == 1
        )

    def add_pair(
        self, preference_id: str, pair: PreferencePair, held_out: bool, trained: bool = False
    ) -> None:
        """`trained`: the served version already learnt from it (replay data, never "new")."""
        self.db.execute(
            f"INSERT OR IGNORE INTO pairs (preference_id, {PAIR_COLUMNS}, held_out, trained) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (
                preference_id,
                pair.prompt,
                pair.chosen,
                pair.rejected,
                pair.source,
                pair.cohort,
                int(held_out),
                int(trained),
            ),
        )

    def base_cutoff(self) -> dict[int, int] | None:
        """Partition -> the topic's end offset when the refresh first started (see
        RefreshSettings.base_trained_on_existing), or None when not recorded."""
        row = self.db.execute("SELECT value FROM state WHERE key='base_cutoff'").fetchone()
        return None if row is None else {int(k): int(v) for k, v in json.loads(row[0]).items()}

    def set_base_cutoff(self, ends: dict[int, int]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO state VALUES ('base_cutoff', ?)", (json.dumps(ends),)
        )

    def count(self, held_out: bool, trained: bool | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM pairs WHERE held_out=?", [int(held_out)]
        if trained is not None:
            sql, args = sql + " AND trained=?", args + [int(trained)]
        return self.db.execute(sql, args).fetchone()[0]

    def new_training_pairs(self) -> list[tuple[int, PreferencePair]]:
        """(seq, pair) of training pairs no refresh has used yet, oldest first."""
        rows = self.db.execute(
            f"SELECT seq, {PAIR_COLUMNS} FROM pairs WHERE held_out=0 AND trained=0 ORDER BY seq"
        ).fetchall()
        return [(seq, PreferencePair(*texts)) for seq, *texts in rows]

    def trained_seqs(self) -> list[int]:
        return [
            r[0]
            for r in self.db.execute(
                "SELECT seq FROM pairs WHERE held_out=0 AND trained=1 ORDER BY seq"
            )
        ]

    def pairs_by_seq(self, seqs: list[int]) -> list[PreferencePair]:
        out = []
        for start in range(0, len(seqs), 500):  # sqlite's bound-parameter limit
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            out += [
                PreferencePair(*r)
                for r in self.db.execute(
                    f"SELECT {PAIR_COLUMNS} FROM pairs WHERE seq IN ({marks}) ORDER BY seq",
                    chunk,
                )
            ]
        return out

    def held_out_pairs(self, limit: int) -> list[PreferencePair]:
        """The newest `limit` held-out pairs, in store order."""
        rows = self.db.execute(
            f"SELECT {PAIR_COLUMNS} FROM (SELECT * FROM pairs "
            "WHERE held_out=1 ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (limit,),
        )
        return [PreferencePair(*r) for r in rows]

    def all_pairs(self) -> list[PreferencePair]:
        """Every stored pair, both splits, in store order (for the labellers' agreement)."""
        rows = self.db.execute(f"SELECT {PAIR_COLUMNS} FROM pairs ORDER BY seq")
        return [PreferencePair(*r) for r in rows]

    def mark_trained(self, up_to_seq: int) -> None:
        self.db.execute("UPDATE pairs SET trained=1 WHERE held_out=0 AND seq<=?", (up_to_seq,))

    def current(self, base: CurrentVersion) -> CurrentVersion:
        row = self.db.execute("SELECT value FROM state WHERE key='current'").fetchone()
        if row is None:
            return base
        data = json.loads(row[0])
        return CurrentVersion(
            int(data["version"]),
            Path(data["path"]),
            dict(data["file_sha256"]),
            bool(data["reload_pending"]),
        )

    def set_current(self, current: CurrentVersion) -> None:
        value = json.dumps(
            {
                "version": current.version,
                "path": str(current.path),
                "file_sha256": current.file_sha256,
                "reload_pending": current.reload_pending,
            }
        )
        self.db.execute("INSERT OR REPLACE INTO state VALUES ('current', ?)", (value,))
