"""The sample store: accepted samples on disk, idempotent by their compact id.

SQLite gives us durability and a primary key for free: a batch's new samples are committed
together before the batch is acked, and an id stored before is recognised, never stored twice
(the same content again is a duplicate; other content under a stored id is refused). The ingest
counters (samples and bytes received, duplicates, rejections) are committed with each batch, so
a ground station restarted on the same store reports the whole run's figures.

The registry lives here too (table `nodes`): which nodes registered, at which address, and
which satellites each sensor host enrolled, so a restarted ground station still knows its
nodes and accepts the enrolled sensors' samples before they have registered again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

_ROW = struct.Struct("<qqqqqqdq")  # a sample's fields before its data, for the digest


class StoreMismatchError(ValueError):
    pass


class Row(NamedTuple):
    """One stored sample: its payload as it arrived (sparsat.node.wire.downlink.Payload) and
    its sender."""

    id: int
    satellite: str
    label: int
    runs: bool  # patches: the visible-token code is runs
    height: int  # patches; 0 for CLS tokens
    width: int
    channels: int
    scale: float  # int8 CLS tokens; int8 / int4 codes of projected ones
    data: bytes
    basis: int = 0  # projected CLS tokens: the Basis.version of their codes


class NodeRecord(NamedTuple):
    """One node's registration (the fields of proto NodeInfo; role: its enum number)."""

    node_id: str
    role: int
    address: str
    satellites: tuple[str, ...]
    device: str


class SampleStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False)
        # WAL + synchronous=NORMAL: a commit survives a crash of this process; one fsync per
        # checkpoint instead of per batch keeps ingest fast.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        if "samples" in tables:  # sparsat before the batched downlink: text sample ids
            raise StoreMismatchError(f"{path} was written by an older sparsat (one message per "
                                     "sample); use another --store directory or delete it")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS payloads (id INTEGER PRIMARY KEY, satellite TEXT NOT "
            "NULL, label INTEGER NOT NULL, runs INTEGER NOT NULL, height INTEGER NOT NULL, "
            "width INTEGER NOT NULL, channels INTEGER NOT NULL, scale REAL NOT NULL, "
            "data BLOB NOT NULL)")
        # every batch received: who sent it, its ids in order, its wire size (an audit trail:
        # a batch rebuilt from its stored samples must have that size)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "satellite TEXT NOT NULL, named INTEGER NOT NULL, ids BLOB NOT NULL, "
            "wire_bytes INTEGER NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, role INTEGER NOT NULL, "
            "address TEXT NOT NULL, satellites TEXT NOT NULL, device TEXT NOT NULL)")
        if "basis" not in {r[1] for r in self._db.execute("PRAGMA table_info(payloads)")}:
            self._db.execute("ALTER TABLE payloads ADD COLUMN basis INTEGER NOT NULL DEFAULT 0")
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(batches)")}
        if "transmit_id" not in columns:  # a store from before streaming missions
            self._db.execute("ALTER TABLE batches ADD COLUMN transmit_id INTEGER NOT NULL "
                             "DEFAULT 0")
        # streaming missions: the batch (of a Transmit, DownlinkBatch.transmit_id) that brought
        # each sample, and the mission time it finished on the air once mission control said
        # (Mission.Arrived); NULL until then: not usable for training
        self._db.execute("CREATE TABLE IF NOT EXISTS arrivals (id INTEGER PRIMARY KEY, "
                         "batch_seq INTEGER NOT NULL, arrival_s REAL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS arrivals_batch ON arrivals (batch_seq)")
        self._db.execute("CREATE INDEX IF NOT EXISTS batches_transmit ON batches "
                         "(satellite, transmit_id)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        # projected payloads: every basis (serialized sparsat.v1.Basis) and zstd dictionary
        # uplinked, so a restarted ground station still reads the codes made with them
        self._db.execute("CREATE TABLE IF NOT EXISTS uplinked (version INTEGER PRIMARY KEY, "
                         "basis BLOB NOT NULL, dictionary BLOB NOT NULL, fit_tokens INTEGER "
                         "NOT NULL, fit_s REAL NOT NULL, seq INTEGER NOT NULL)")
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

    def put_batch(self, rows: list[Row], wire_bytes: int, ids: bytes, satellite: str,
                  named: bool, rejected: int, transmit_id: int = 0
                  ) -> tuple[list[int], list[int]]:
        """Store the rows whose id is new, in one transaction with the batch's record (`ids`:
        all its ids as int64, in order; `named`: it carried the satellite's name) and
        counters (`rejected`: samples refused before this call). Returns the indices into
        `rows` of duplicates (same id and content stored before) and of conflicts (another
        content under a stored id: not stored, counted as rejected). With a `transmit_id`
        (streaming missions) the new samples wait for their arrival stamp (stamp), and a
        duplicate not yet stamped now arrives with this batch (its first copy's batch was
        never reported on the air)."""
        with self._lock:
            # a sample's content: everything but its sender (an int8 token's scale included)
            stored: dict[int, tuple[int, bool, int, int, int, float, bytes, int]] = {}
            row_ids = [r.id for r in rows]
            for start in range(0, len(row_ids), 500):
                part = row_ids[start : start + 500]
                stored.update((i, (label, bool(runs), h, w, c, scale, bytes(data), basis))
                              for i, label, runs, h, w, c, scale, data, basis in self._db.execute(
                    f"SELECT id, label, runs, height, width, channels, scale, data, basis FROM "
                    f"payloads WHERE id IN ({','.join('?' * len(part))})", part))
            duplicates, conflicts, new = [], [], []
            seen: set[int] = set()
            for k, r in enumerate(rows):
                old = stored.get(r.id)
                if old is None and r.id not in seen:
                    new.append(r)
                    seen.add(r.id)
                elif old is not None and old == (r.label, r.runs, r.height, r.width, r.channels,
                                                 r.scale, r.data, r.basis):
                    duplicates.append(k)
                else:
                    conflicts.append(k)
            try:  # all of the batch or none of it
                self._db.executemany("INSERT INTO payloads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                     new)
                seq = self._db.execute(
                    "INSERT INTO batches (satellite, named, ids, wire_bytes, transmit_id) "
                    "VALUES (?, ?, ?, ?, ?)", (satellite, int(named), ids, wire_bytes,
                                               transmit_id)).lastrowid
                if transmit_id:
                    self._db.executemany("INSERT INTO arrivals VALUES (?, ?, NULL)",
                                         [(r.id, seq) for r in new])
                    again = [(rows[k].id, seq) for k in duplicates]
                    self._db.executemany("INSERT OR IGNORE INTO arrivals VALUES (?, ?, NULL)",
                                         again)  # first stored outside a stream's Transmit
                    self._db.executemany(
                        "UPDATE arrivals SET batch_seq = ? WHERE id = ? AND arrival_s IS NULL",
                        [(s, i) for i, s in again])
                self._add({"received": len(ids) // 8, "received_bytes": wire_bytes,
                           "duplicates": len(duplicates),
                           "rejected": rejected + len(conflicts)})
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
            return duplicates, conflicts

    def stamp(self, satellite: str, transmit_id: int, ends_s: list[float]) -> int:
        """Stamp the new samples of the first len(ends_s) batches `satellite` sent under
        `transmit_id`, in order, with those arrival times (a batch past the list is not
        stamped: mission control did not see it on the air). Samples stamped before keep
        their stamp. Returns how many were stamped."""
        with self._lock:
            seqs = [s for (s,) in self._db.execute(
                "SELECT seq FROM batches WHERE satellite = ? AND transmit_id = ? ORDER BY seq "
                "LIMIT ?", (satellite, transmit_id, len(ends_s)))]
            stamped = 0
            for seq, end in zip(seqs, ends_s, strict=False):
                stamped += self._db.execute(
                    "UPDATE arrivals SET arrival_s = ? WHERE batch_seq = ? AND arrival_s IS "
                    "NULL", (end, seq)).rowcount
            self._add({"arrived": stamped})
            self._db.commit()
            return stamped

    def arrived(self, upto_s: float) -> list[tuple[float, int]]:
        """(arrival time, id) of every sample stamped at or before `upto_s`, in that order."""
        with self._lock:
            return [(float(a), int(i)) for a, i in self._db.execute(
                "SELECT arrival_s, id FROM arrivals WHERE arrival_s <= ? ORDER BY arrival_s, "
                "id", (upto_s,))]

    def rows_of(self, ids: list[int], chunk: int = 500) -> Iterator[Row]:
        """The stored samples `ids`, in that order."""
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            with self._lock:
                found = {r[0]: r for r in self._db.execute(
                    f"SELECT * FROM payloads WHERE id IN ({','.join('?' * len(part))})", part)}
            for i in part:
                i_, s, y, r, h, w, c, sc, d, b = found[i]
                yield Row(i_, s, y, bool(r), h, w, c, sc, bytes(d), b)

    def save_node(self, node: NodeRecord) -> None:
        """Insert or replace one node's registration, committed before Register answers."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?)",
                             (node.node_id, node.role, node.address,
                              json.dumps(list(node.satellites)), node.device))
            self._db.commit()

    def nodes(self) -> list[NodeRecord]:
        """Every registration stored, in node id order."""
        with self._lock:
            found = self._db.execute("SELECT node_id, role, address, satellites, device FROM "
                                     "nodes ORDER BY node_id").fetchall()
        return [NodeRecord(n, r, a, tuple(json.loads(s)), d) for n, r, a, s, d in found]

    def save_uplinked(self, version: int, basis: bytes, dictionary: bytes, fit_tokens: int,
                      fit_s: float) -> None:
        """Record a basis (its serialized message) and dictionary, committed before they are
        handed out."""
        with self._lock:
            seq = self._db.execute("SELECT COUNT(*) FROM uplinked").fetchone()[0]
            self._db.execute("INSERT OR IGNORE INTO uplinked VALUES (?, ?, ?, ?, ?, ?)",
                             (version, basis, dictionary, fit_tokens, fit_s, seq))
            self._db.commit()

    def uplinked(self) -> list[tuple[int, bytes, bytes, int, float]]:
        """Every basis recorded, oldest first: (version, basis, dictionary, fit_tokens, fit_s)."""
        with self._lock:
            return [(int(v), bytes(b), bytes(d), int(n), float(t)) for v, b, d, n, t in
                    self._db.execute("SELECT version, basis, dictionary, fit_tokens, fit_s "
                                     "FROM uplinked ORDER BY seq")]

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
            return int(self._db.execute("SELECT COUNT(*) FROM payloads").fetchone()[0])

    def version(self) -> tuple[int, int, int]:
        """(count, sum of ids, largest id): samples are only ever added, so this names the
        store's content (the encoder stage's cache key)."""
        with self._lock:
            n, total, top = self._db.execute(
                "SELECT COUNT(*), TOTAL(id), MAX(id) FROM payloads").fetchone()
        return int(n), int(total), int(top if top is not None else -1)

    def content_digest(self) -> tuple[int, int, str]:
        """(count, largest id, digest of the stored samples): every id and its content (label,
        payload fields, data; not its sender), in id order, read in one snapshot (a read
        transaction of its own: samples arriving meanwhile are neither seen nor blocked).
        Names exactly which samples an encoded training split holds (the token cache's key)."""
        h = hashlib.blake2b(digest_size=16)
        n, top = 0, -1
        db = sqlite3.connect(self.path)
        try:
            cur = db.execute("SELECT id, label, runs, height, width, channels, scale, data, "
                             "basis FROM payloads ORDER BY id")
            while part := cur.fetchmany(4096):
                for i, label, runs, height, width, channels, scale, data, basis in part:
                    h.update(_ROW.pack(i, label, runs, height, width, channels, scale,
                                       len(data)))
                    if basis:  # projected tokens (digests of other samples as before)
                        h.update(basis.to_bytes(4, "little"))
                    h.update(data)
                n += len(part)
                top = part[-1][0]
        finally:
            db.close()
        return n, top, h.hexdigest()

    def rows(self, chunk: int = 4096, upto: int | None = None) -> Iterator[list[Row]]:
        """Stored samples in id order, `chunk` rows at a time (memory independent of the
        store's size); `upto`: only ids up to that one (a snapshot while samples arrive)."""
        last = -1
        top = upto if upto is not None else (1 << 62)
        while True:
            with self._lock:
                part = self._db.execute(
                    "SELECT * FROM payloads WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                    (last, top, chunk)).fetchall()
            if not part:
                return
            yield [Row(i, s, y, bool(r), h, w, c, sc, bytes(d), b)
                   for i, s, y, r, h, w, c, sc, d, b in part]
            last = part[-1][0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
