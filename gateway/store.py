"""The SQLite store: schema, migrations, connections and read queries.

One database file holds the journal (``records``, never updated or deleted), the request-id
table for exactly-once (``requests``), the committed head of every chain (``heads``), the
public keys (``keys``), and the work queues written in the same transaction as each record
(``outbox`` for sync processors, ``print_jobs`` for printers), and the gateway-wide events
held until the first chain exists (``held_events``).

Durability settings: WAL journal, ``synchronous=FULL`` (every commit fsyncs the WAL). Only
the ledger writer thread writes records (gateway.ledger); readers open their own
connections. Files are created 0600: the journal is nobody else's business.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from gateway.core.errors import IntegrityError, StorageError
from gateway.core.verify import StoredRecord

SCHEMA_VERSION = 7

# Each entry migrates from version i to i+1; never edit a shipped migration, add one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE keys (
        key_id      TEXT PRIMARY KEY,
        public_pem  TEXT NOT NULL,
        added_at    TEXT NOT NULL
    );
    CREATE TABLE records (
        chain       TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        type        TEXT NOT NULL,
        number      INTEGER NOT NULL,
        time        TEXT NOT NULL,
        client      TEXT NOT NULL,
        request_id  TEXT NOT NULL,
        key_id      TEXT NOT NULL,
        hash        TEXT NOT NULL,
        sig         TEXT NOT NULL,
        body        BLOB NOT NULL,
        PRIMARY KEY (chain, seq)
    );
    CREATE TABLE requests (
        client      TEXT NOT NULL,
        request_id  TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        chain       TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (client, request_id)
    ) WITHOUT ROWID;
    CREATE TABLE heads (
        chain       TEXT PRIMARY KEY,
        seq         INTEGER NOT NULL,
        hash        TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        processor        TEXT NOT NULL,
        chain            TEXT NOT NULL,
        seq              INTEGER NOT NULL,
        idempotency_key  TEXT NOT NULL,
        state            TEXT NOT NULL DEFAULT 'pending',
        attempts         INTEGER NOT NULL DEFAULT 0,
        last_error       TEXT,
        updated_at       TEXT,
        PRIMARY KEY (processor, chain, seq)
    ) WITHOUT ROWID;
    CREATE INDEX outbox_pending ON outbox (processor, state, chain, seq);
    CREATE TABLE print_jobs (
        id          INTEGER PRIMARY KEY,
        chain       TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        state       TEXT NOT NULL DEFAULT 'pending',
        attempts    INTEGER NOT NULL DEFAULT 0,
        last_error  TEXT,
        updated_at  TEXT
    );
    CREATE INDEX print_jobs_pending ON print_jobs (state, id);
    """,
    # 2: journal-wide unique claims (a sale is cancelled/corrected once; duplicate numbers)
    """
    CREATE TABLE claims (
        key         TEXT PRIMARY KEY,
        chain       TEXT NOT NULL,
        seq         INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # 3: sync engine (docs/sync.md): the cloud id of a record's first call when a later call
    # failed (so a retry after the cloud's 24 h idempotency window makes no duplicate), the
    # uplink state per processor and chain, and one row per processor run (24 h stats)
    """
    ALTER TABLE outbox ADD COLUMN cloud_ref TEXT;
    CREATE TABLE sync_uplink (
        processor      TEXT NOT NULL,
        chain          TEXT NOT NULL,
        state          TEXT NOT NULL,
        since_ms       INTEGER NOT NULL,
        failures       INTEGER NOT NULL DEFAULT 0,
        next_probe_ms  INTEGER NOT NULL DEFAULT 0,
        last_error     TEXT,
        PRIMARY KEY (processor, chain)
    ) WITHOUT ROWID;
    CREATE TABLE sync_runs (
        id               INTEGER PRIMARY KEY,
        processor        TEXT NOT NULL,
        started_ms       INTEGER NOT NULL,
        trigger          TEXT NOT NULL,
        batches_created  INTEGER NOT NULL,
        batches_retried  INTEGER NOT NULL,
        accepted         INTEGER NOT NULL,
        rejected         INTEGER NOT NULL,
        failed           INTEGER NOT NULL,
        errors_count     INTEGER NOT NULL,
        failure_rate     REAL NOT NULL,
        alert_triggered  INTEGER NOT NULL,
        duration_ms      INTEGER NOT NULL,
        run_error        TEXT
    );
    CREATE INDEX sync_runs_time ON sync_runs (processor, started_ms);
    """,
    # 4: batch processors (gateway/batch_sync.py): submitted batches still to poll (items:
    # JSON [[chain, seq, doc_id], ...]), and the send times of the last batches (the
    # persisted rate-limit bucket)
    """
    CREATE TABLE sync_batches (
        processor     TEXT NOT NULL,
        batch_id      TEXT NOT NULL,
        state         TEXT NOT NULL,
        submitted_ms  INTEGER NOT NULL,
        items         TEXT NOT NULL,
        PRIMARY KEY (processor, batch_id)
    ) WITHOUT ROWID;
    CREATE INDEX sync_batches_open ON sync_batches (processor, state);
    CREATE TABLE sync_rate (
        processor  TEXT NOT NULL,
        sent_ms    INTEGER NOT NULL
    );
    """,
    # 5: gateway-wide technical events recorded while no chain exists yet (a fresh install
    # before its first sale): held here, in the order they came, and written by the ledger
    # writer as the first records of the first chain made, in that chain's first transaction
    # (docs/events.md, "Which chain"); payload is the event's JSON
    """
    CREATE TABLE held_events (
        id          INTEGER PRIMARY KEY,
        time_ms     INTEGER NOT NULL,
        request_id  TEXT NOT NULL UNIQUE,
        payload     TEXT NOT NULL
    );
    """,
    # 6: batch processors: when the cloud answered 429, no request to it before until_ms
    # (its Retry-After, bounded; gateway/batch_sync.py), kept so a restart does not send early
    """
    CREATE TABLE sync_hold (
        processor  TEXT PRIMARY KEY,
        until_ms   INTEGER NOT NULL,
        reason     TEXT
    ) WITHOUT ROWID;
    """,
    # 7: each chain's technical events, newest first, without reading its sales (the status
    # page's event list, gateway/technician.py); only event records are in it
    """
    CREATE INDEX records_events ON records (chain, seq) WHERE type = 'INTENTION::EVENT';
    """,
)


def create_private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 if missing (SQLite copies it to -wal/-shm)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def connect(path: Path, *, write: bool) -> sqlite3.Connection:
    """Open a connection with the store's pragmas (writer: no auto-checkpoint)."""
    try:
        if write:
            create_private_file(path)
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
        else:
            if not path.exists():
                raise StorageError(f"database {path} does not exist")
            conn = sqlite3.connect(
                f"file:{path}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=10.0,
            )
        conn.execute("PRAGMA busy_timeout = 10000")
        if write:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(f"cannot put {path} in WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA foreign_keys = ON")
        return conn
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open database {path}: {exc}") from exc


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; refuse a database from a newer version."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"database schema version {version} is newer than this gateway's {SCHEMA_VERSION}"
        )
    while version < SCHEMA_VERSION:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in MIGRATIONS[version].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            version += 1
            conn.execute(f"PRAGMA user_version = {version:d}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return version


def quick_check(conn: sqlite3.Connection) -> None:
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        raise IntegrityError("SQLite quick_check failed: " + "; ".join(r[0] for r in rows[:5]))


def warm_page_cache(path: Path) -> None:
    """Read the whole file once, sequentially, into the kernel's page cache.

    ``quick_check`` visits pages in B-tree order, one 4 KiB read at a time: on a file that
    is not cached that is random I/O (23 s for 1.5 GB on the reference box, against 0.6 s
    for this sequential pass, then 1 s for the check; docs/performance.md). ``sendfile`` to
    /dev/null reads without copying anything into this process; on a cached file it costs
    milliseconds. Best effort: any error just leaves the check to read cold.
    """
    try:
        src = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        dst = os.open(os.devnull, os.O_WRONLY)
        try:
            size = os.fstat(src).st_size
            offset = 0
            while offset < size:
                sent = os.sendfile(dst, src, offset, min(size - offset, 1 << 30))
                if sent <= 0:
                    break
                offset += sent
        finally:
            os.close(dst)
    except OSError:
        pass
    finally:
        os.close(src)


@dataclass(frozen=True, slots=True)
class Head:
    chain: str
    seq: int
    hash: str


class Reader:
    """Read-only queries on a store (own connection; safe from any single thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path, write=False)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heads(self) -> list[Head]:
        return [
            Head(*r) for r in self.conn.execute("SELECT chain, seq, hash FROM heads ORDER BY chain")
        ]

    def chains(self) -> list[str]:
        """Every chain that has records or a head (a head without records is a loss)."""
        rows = self.conn.execute(
            "SELECT chain FROM heads UNION SELECT DISTINCT chain FROM records ORDER BY 1"
        )
        return [r[0] for r in rows]

    def public_keys(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key_id, public_pem FROM keys"))

    def count(self, chain: str | None = None) -> int:
        if chain is None:
            return int(self.conn.execute("SELECT count(*) FROM records").fetchone()[0])
        return int(
            self.conn.execute("SELECT count(*) FROM records WHERE chain = ?", (chain,)).fetchone()[
                0
            ]
        )

    def iter_records(
        self, chain: str, from_seq: int = 1, to_seq: int | None = None, *, chunk: int = 2000
    ) -> Iterator[StoredRecord]:
        """Records of a chain in seq order (as stored; nothing is trusted)."""
        last = to_seq if to_seq is not None else 2**62
        seq = from_seq
        with closing(self.conn.cursor()) as cur:
            while True:
                rows = cur.execute(
                    "SELECT seq, body, hash, sig FROM records WHERE chain = ? AND seq >= ? "
                    "AND seq <= ? ORDER BY seq LIMIT ?",
                    (chain, seq, last, chunk),
                ).fetchall()
                for _, body, h, sig in rows:
                    yield StoredRecord(bytes(body), h, sig)
                if len(rows) < chunk:
                    return
                seq = rows[-1][0] + 1

    def record(self, chain: str, seq: int) -> StoredRecord | None:
        row = self.conn.execute(
            "SELECT body, hash, sig FROM records WHERE chain = ? AND seq = ?", (chain, seq)
        ).fetchone()
        return StoredRecord(bytes(row[0]), row[1], row[2]) if row else None

    def outbox_depth(self) -> dict[str, int]:
        return dict(
            self.conn.execute(
                "SELECT processor, count(*) FROM outbox WHERE state = 'pending' GROUP BY processor"
            )
        )

    def print_queue_depth(self) -> int:
        return int(
            self.conn.execute("SELECT count(*) FROM print_jobs WHERE state = 'pending'").fetchone()[
                0
            ]
        )
