"""The sample store: accepted samples on disk, idempotent by sample_id.

SQLite gives us durability and a primary key for free: a sample is acked only after its row
is committed, and a retried sample_id is recognised, never stored twice. The ingest counters
(messages and bytes received, duplicates, rejections) are committed with each sample, so a
ground station restarted on the same store reports the whole run's figures.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path


class StoreMismatchError(ValueError):
    pass


class SampleStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        # WAL + synchronous=NORMAL: a commit survives a crash of this process; one fsync per
        # checkpoint instead of per sample keeps ingest fast.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS samples (sample_id TEXT PRIMARY KEY, sensor_id TEXT"
            " NOT NULL, label INTEGER NOT NULL, message BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value "
                         "INTEGER NOT NULL)")
        self._db.commit()

    def bind(self, fingerprint: str) -> None:
        """Tie the store to one sensor configuration: samples made under another (mask,
        payload, dataset...) would be acked as duplicates and silently trained on."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('config', ?)", (fingerprint,))
                self._db.commit()
            elif row[0] != fingerprint:
                raise StoreMismatchError(
                    f"{self.path} holds samples of another scenario configuration; "
                    f"use another --store directory or delete it")

    def put(self, sample_id: str, sensor_id: str, label: int, message: bytes,
            wire_bytes: int = 0) -> bool:
        """Store one serialized Sample; False (and nothing written) if sample_id is known.
        Either way the message is counted as received, with its `wire_bytes`."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO samples VALUES (?, ?, ?, ?)",
                (sample_id, sensor_id, label, message),
            )
            new = cur.rowcount == 1
            self._add({"received": 1, "received_bytes": wire_bytes, "duplicates": int(not new)})
            self._db.commit()
            return new

    def count(self, **deltas: int) -> None:
        """Add to named counters (e.g. rejected=1, received_bytes=n), committed at once."""
        with self._lock:
            self._add(deltas)
            self._db.commit()

    def _add(self, deltas: dict[str, int]) -> None:
        self._db.executemany(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value "
            "+ excluded.value", list(deltas.items()))

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._db.execute("SELECT name, value FROM counters").fetchall())

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def messages(self) -> Iterator[bytes]:
        """Every stored message, ordered by sample_id so downstream order is reproducible."""
        with self._lock:
            rows = self._db.execute("SELECT message FROM samples ORDER BY sample_id").fetchall()
        for (message,) in rows:
            yield bytes(message)

    def close(self) -> None:
        with self._lock:
            self._db.close()
