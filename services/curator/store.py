"""The curator's local state store (sqlite): generations seen, feedback waiting for its
generation, feedback ids already joined, judged answers per prompt, pairs emitted, and the next
Kafka offset of every partition.

All of it changes in one sqlite transaction per batch, committed only after the batch's
preference records were acknowledged by Kafka and before the consumer offsets are committed to
Kafka; on restart the consumer seeks to the offsets stored here. So a crash at any point either
replays a batch whose outputs carry the same ids (recognised downstream) or nothing at all.
"""

from __future__ import annotations

from pathlib import Path

from services.common.durable import DurableStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
  response_id TEXT PRIMARY KEY, partition INTEGER, prompt TEXT, prompt_key TEXT,
  response TEXT, seen_at REAL, conversation BLOB);
CREATE INDEX IF NOT EXISTS generations_seen ON generations(seen_at);
CREATE TABLE IF NOT EXISTS pending (
  feedback_id TEXT PRIMARY KEY, response_id TEXT, partition INTEGER, event BLOB, arrived_at REAL);
CREATE INDEX IF NOT EXISTS pending_response ON pending(response_id);
CREATE INDEX IF NOT EXISTS pending_age ON pending(partition, arrived_at);
CREATE TABLE IF NOT EXISTS joined (feedback_id TEXT PRIMARY KEY, seen_at REAL);
CREATE TABLE IF NOT EXISTS judged (
  prompt_key TEXT, response_id TEXT, desirable INTEGER, response TEXT, seen_at REAL,
  cohort TEXT NOT NULL DEFAULT '', PRIMARY KEY (prompt_key, response_id, desirable));
CREATE TABLE IF NOT EXISTS emitted (preference_id TEXT PRIMARY KEY, seen_at REAL);
"""


class JoinStore(DurableStore):
    """A thin, typed layer over the curator's sqlite file."""

    def __init__(self, state_dir: Path):
        super().__init__(state_dir, "curator.sqlite", SCHEMA)
        self._add_column("generations", "conversation", "BLOB")
        self._add_column("judged", "cohort", "TEXT NOT NULL DEFAULT ''")

    def _add_column(self, table: str, column: str, declaration: str) -> None:
        """Brings a store written before `column` existed up to the schema."""
        columns = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            self.db.commit()

    # ----- generations -----
    def add_generation(
        self,
        response_id: str,
        partition: int,
        prompt: str,
        prompt_key: str,
        response: str,
        now: float,
        conversation: bytes = b"",
    ) -> None:
        """`conversation` is the serialized wire `Prompt` the generation answered."""
        self.db.execute(
            "INSERT OR IGNORE INTO generations"
            " (response_id, partition, prompt, prompt_key, response, seen_at, conversation)"
            " VALUES (?,?,?,?,?,?,?)",
            (response_id, partition, prompt, prompt_key, response, now, conversation),
        )

    def generation(self, response_id: str) -> tuple[str, str, str, bytes] | None:
        """(prompt, prompt_key, response, serialized conversation) of a served generation."""
        row = self.db.execute(
            "SELECT prompt, prompt_key, response, conversation FROM generations"
            " WHERE response_id=?",
            (response_id,),
        ).fetchone()
        return (row[0], row[1], row[2], row[3] or b"") if row else None

    # ----- feedback waiting for its generation -----
    def add_pending(
        self, feedback_id: str, response_id: str, partition: int, event: bytes, now: float
    ) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO pending VALUES (?,?,?,?,?)",
            (feedback_id, response_id, partition, event, now),
        )

    def take_pending(self, response_id: str) -> list[bytes]:
        rows = self.db.execute(
            "SELECT event FROM pending WHERE response_id=? ORDER BY arrived_at", (response_id,)
        ).fetchall()
        self.db.execute("DELETE FROM pending WHERE response_id=?", (response_id,))
        return [r[0] for r in rows]

    def pending_count(self, partition: int | None = None) -> int:
        if partition is None:
            return self.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
        return self.db.execute(
            "SELECT COUNT(*) FROM pending WHERE partition=?", (partition,)
        ).fetchone()[0]

    def expire_pending(
        self, older_than: float, partition: int | None = None, keep: int | None = None
    ) -> list[str]:
        """Deletes feedback that waited since before `older_than`, or beyond the newest `keep` of
        `partition`; returns the expired feedback ids."""
        if keep is not None:
            rows = self.db.execute(
                "SELECT feedback_id FROM pending WHERE partition=? ORDER BY arrived_at DESC LIMIT -1 OFFSET ?",
                (partition, keep),
            ).fetchall()
        else:
            rows = self.db.execute(
                "SELECT feedback_id FROM pending WHERE arrived_at < ?", (older_than,)
            ).fetchall()
        ids = [r[0] for r in rows]
        self.db.executemany("DELETE FROM pending WHERE feedback_id=?", [(i,) for i in ids])
        return ids

    # ----- de-duplication -----
    def mark_joined(self, feedback_id: str, now: float) -> bool:
        """Records a joined feedback id; False when it was joined before (a duplicate)."""
        cur = self.db.execute("INSERT OR IGNORE INTO joined VALUES (?,?)", (feedback_id, now))
        return cur.rowcount == 1

    def was_joined(self, feedback_id: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM joined WHERE feedback_id=?", (feedback_id,)).fetchone()
            is not None
        )

    def mark_emitted(self, preference_id: str, now: float) -> bool:
        cur = self.db.execute("INSERT OR IGNORE INTO emitted VALUES (?,?)", (preference_id, now))
        return cur.rowcount == 1

    # ----- judged answers, for pairing -----
    def add_judged(
        self,
        prompt_key: str,
        response_id: str,
        desirable: bool,
        response: str,
        now: float,
        cohort: str = "",
    ) -> None:
        """`cohort` is the annotator cohort of the judgement (FeedbackEvent.cohort)."""
        self.db.execute(
            "INSERT OR IGNORE INTO judged"
            " (prompt_key, response_id, desirable, response, seen_at, cohort)"
            " VALUES (?,?,?,?,?,?)",
            (prompt_key, response_id, int(desirable), response, now, cohort),
        )

    def opposite_answers(
        self, prompt_key: str, response_id: str, desirable: bool, limit: int
    ) -> list[tuple[str, str, str]]:
        """(response_id, response, cohort) of other answers to the prompt judged the other way."""
        rows = self.db.execute(
            "SELECT response_id, response, cohort FROM judged WHERE prompt_key=? AND desirable=? "
            "AND response_id<>? ORDER BY seen_at LIMIT ?",
            (prompt_key, int(not desirable), response_id, limit),
        ).fetchall()
        return [tuple(r) for r in rows]

    def prune(self, older_than: float) -> None:
        for table in ("generations", "joined", "judged", "emitted"):
            self.db.execute(f"DELETE FROM {table} WHERE seen_at < ?", (older_than,))
