"""Where CDRs go: SQLite (:class:`CdrStore`) or JSON lines (:class:`JsonLinesCdrStore`).

The B2BUA calls ``write(record)`` from the asyncio event loop when a call ends. That
call only appends to a bounded in-memory queue: it never blocks on the disk and never
raises. A background thread takes what is queued in batches and writes each batch in
one transaction (one commit, or one flush, per batch), so a burst of call ends costs a
few commits rather than one each.

A failing database (disk full, file not writable, locked longer than the busy
timeout, a directory where the file should be) costs the records of the failing
batches, never the SBC: each failure kind is logged once (``x cdr ...``) until a
batch succeeds again, the lost records are counted in ``stats().dropped`` and the
next batch tries again (reopening the file). A full queue drops the newest record.

``close(timeout)`` is called at shutdown, after the calls ended by the shutdown have
been written: it writes what is queued and stops the thread. It blocks for up to
``timeout`` seconds; that is the only blocking call besides the readers
(``recent``, ``by_call_ref``), which the web API runs in a thread.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TextIO

from sbc.cdr.record import CDR_DICT_VERSION, CdrError, CdrRecord

logger = logging.getLogger(__name__)

#: Version of the SQLite layout, kept in the ``schema_version`` table.
SCHEMA_VERSION: Final = 3
#: Records a queue holds by default before it drops new ones.
DEFAULT_MAX_QUEUE: Final = 10_000
#: Most records written in one transaction.
DEFAULT_BATCH_SIZE: Final = 500
#: Seconds SQLite waits for a lock held by another connection before failing.
DEFAULT_BUSY_TIMEOUT: Final = 5.0
#: How long the writer waits for more records once one is queued (seconds): CDRs
#: land at most this much later, in one transaction per burst.
BATCH_LINGER: Final = 0.05
#: Seconds ``close`` waits for the queue to be written by default.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0
#: Most records ``recent`` returns, whatever it is asked for.
MAX_RECENT: Final = 10_000


class CdrReadError(Exception):
    """Reading CDRs back failed (the database is unreadable, locked or corrupt)."""


@dataclass(frozen=True, slots=True)
class CdrStats:
    """Counters of a sink since it was opened."""

    #: Records durably handed to the database (committed) or file (flushed).
    written: int
    #: Records lost: queue full, written after close, or in a batch that failed.
    dropped: int
    #: Records accepted and not yet written (including the batch being written).
    queued: int
    #: Failed attempts to open the store or to write a batch.
    errors: int
    #: Batches written successfully (commits or flushes).
    batches: int


class CdrSink(Protocol):
    """What the B2BUA hands finished calls to."""

    def write(self, record: CdrRecord) -> None:
        """Queue ``record``; never blocks, never raises."""
        ...

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Write what is queued (waiting up to ``timeout`` seconds) and stop."""
        ...

    def stats(self) -> CdrStats:
        """Counters: written, dropped, queued, errors, batches."""
        ...


# --- columns ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    """One column of the ``cdr`` table: its name is the ``to_dict`` key it holds."""

    name: str
    #: SQLite declared type: INTEGER, REAL or TEXT.
    sql_type: str
    not_null: bool = True
    #: SQL DEFAULT of a column added by a later version: what rows written before
    #: it hold once the table is upgraded.
    default: str | None = None

    @property
    def ddl(self) -> str:
        not_null = " NOT NULL" if self.not_null else ""
        default = "" if self.default is None else f" DEFAULT {self.default}"
        return f"{self.name} {self.sql_type}{not_null}{default}"


#: The ``cdr`` table after its ``id`` key, in order. One table drives the DDL, the
#: INSERT and the read-back, and docs/cdr.md documents it (a test compares them).
COLUMNS: Final = (
    Column("call_ref", "TEXT"),
    Column("route", "TEXT"),
    Column("a_realm", "TEXT"),
    Column("b_realm", "TEXT"),
    Column("caller", "TEXT"),
    Column("callee", "TEXT"),
    Column("source", "TEXT"),
    Column("destination", "TEXT"),
    Column("start_time", "REAL"),
    Column("answer_time", "REAL", not_null=False),
    Column("end_time", "REAL"),
    Column("duration", "REAL"),
    Column("setup_time", "REAL", not_null=False),
    Column("disposition", "TEXT"),
    Column("final_status", "INTEGER"),
    Column("hangup_side", "TEXT", not_null=False),
    Column("end_reason", "TEXT"),
    Column("a_codecs", "TEXT"),
    Column("b_codecs", "TEXT"),
    Column("a_to_b_packets", "INTEGER"),
    Column("a_to_b_bytes", "INTEGER"),
    Column("b_to_a_packets", "INTEGER"),
    Column("b_to_a_bytes", "INTEGER"),
    Column("a_loss", "REAL", not_null=False),
    Column("b_loss", "REAL", not_null=False),
    Column("a_jitter_ms", "REAL", not_null=False),
    Column("b_jitter_ms", "REAL", not_null=False),
    Column("rtt_ms", "REAL", not_null=False),
    # Version 2.
    Column("a_encryption", "TEXT", default="''"),
    Column("b_encryption", "TEXT", default="''"),
    # Version 3.
    Column("trunk", "TEXT", default="''"),
    Column("gateway", "TEXT", default="''"),
)

_NAMES: Final = tuple(column.name for column in COLUMNS)

_CREATE_STATEMENTS: Final = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS cdr (id INTEGER PRIMARY KEY, "
    + ", ".join(c.ddl for c in COLUMNS)
    + ")",
    "CREATE INDEX IF NOT EXISTS cdr_start_time ON cdr (start_time)",
    "CREATE INDEX IF NOT EXISTS cdr_call_ref ON cdr (call_ref)",
)
_INSERT: Final = f"INSERT INTO cdr ({', '.join(_NAMES)}) VALUES ({', '.join('?' for _ in _NAMES)})"
_SELECT: Final = f"SELECT {', '.join(_NAMES)} FROM cdr"


#: Versions the SBC upgrades in place, to the columns each later version added
#: (SQLite ALTER TABLE ADD COLUMN: existing rows take the column's DEFAULT).
_UPGRADES: Final = {
    1: ("a_encryption", "b_encryption", "trunk", "gateway"),
    2: ("trunk", "gateway"),
}


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    """The ``cdr`` table of ``version`` made the current one, in the caller's
    transaction: the columns added since, and the new version number."""
    by_name = {column.name: column for column in COLUMNS}
    for name in _UPGRADES[version]:
        conn.execute(f"ALTER TABLE cdr ADD COLUMN {by_name[name].ddl}")
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))


def record_to_row(record: CdrRecord) -> tuple[Any, ...]:
    """The ``cdr`` row of a record, in :data:`COLUMNS` order."""
    data = record.to_dict()
    return tuple(data[name] for name in _NAMES)


def record_from_row(row: Sequence[Any]) -> CdrRecord:
    """The record a ``cdr`` row (in :data:`COLUMNS` order) holds; CdrError if it is bad."""
    if len(row) != len(_NAMES):
        raise CdrError(f"cdr row has {len(row)} columns, expected {len(_NAMES)}")
    return CdrRecord.from_dict({"version": CDR_DICT_VERSION, **dict(zip(_NAMES, row, strict=True))})


def _storable(text: str) -> str:
    """``text`` as valid UTF-8: escaped octets that are not UTF-8 become U+FFFD, other
    lone surrogates ``?``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape" if _escapes_only(text) else "replace")
        return raw.decode("utf-8", "replace")
    return text


def _escapes_only(text: str) -> bool:
    """Whether every surrogate in ``text`` is a surrogateescape'd octet (U+DC80..DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


class _SchemaMismatch(Exception):
    """The database was written by a different schema version."""


def _failure_kind(exc: BaseException) -> str:
    # SQLite's own error name tells disk full (SQLITE_FULL) from read-only
    # (SQLITE_READONLY), locked (SQLITE_BUSY) or unopenable (SQLITE_CANTOPEN).
    name = getattr(exc, "sqlite_errorname", None)
    if isinstance(name, str):
        return name
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
    return type(exc).__name__


# --- the queue and writer thread ---------------------------------------------------


class _QueuedSink:
    """A bounded queue drained in batches by one writer thread; subclasses do the I/O.

    Only the writer thread touches the file or database (``_open``, ``_write_batch``,
    ``_release``); the queue and counters are shared under ``_lock``.
    """

    def __init__(self, target: Path, *, max_queue: int, batch_size: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue {max_queue} is not positive")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} is not positive")
        self.path = target
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._pending: deque[CdrRecord] = deque()
        self._in_flight = 0
        self._closing = False
        self._overflowing = False
        self._logged: set[str] = set()
        self._written = 0
        self._dropped = 0
        self._errors = 0
        self._batches = 0
        self._open_ok = False
        self._thread = threading.Thread(
            target=self._run, name=f"cdr-writer {target.name}", daemon=True
        )

    # -- what the event loop calls -------------------------------------------------

    def write(self, record: CdrRecord) -> None:
        """Queue ``record`` for the writer thread; never blocks on I/O, never raises.

        Dropped (and counted) when the queue is full or the sink is closed.
        """
        message = None
        with self._lock:
            if self._closing:
                self._dropped += 1
                message = self._first("closed", "closed: CDRs written after close are dropped")
            elif len(self._pending) >= self._max_queue:
                self._dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                    message = (
                        f"queue full ({self._max_queue} records): dropping new CDRs until it drains"
                    )
            else:
                pending = self._pending
                pending.append(record)
                # Wake the writer when work appears and when a batch is full; in between
                # it lingers to gather a batch (one wake-up per call cost the event loop
                # the GIL hand-overs of a thread switch each time).
                if len(pending) == 1 or len(pending) == self._batch_size:
                    self._has_work.notify()
        if message is not None:
            logger.error("x cdr %s: %s", self.path, message)

    def stats(self) -> CdrStats:
        """Counters since the sink was opened."""
        with self._lock:
            return CdrStats(
                written=self._written,
                dropped=self._dropped,
                queued=len(self._pending) + self._in_flight,
                errors=self._errors,
                batches=self._batches,
            )

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is written or dropped; False on timeout.

        Blocks: meant for tests and tools, not for the event loop.
        """
        with self._lock:
            self._has_work.notify()  # no lingering: write now
            return self._idle.wait_for(
                lambda: not self._pending and not self._in_flight, timeout=timeout
            )

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Write what is queued (up to ``timeout`` seconds), then stop the writer thread.

        Records still queued when the timeout expires are logged; later writes are
        dropped. Closing twice is harmless.
        """
        with self._lock:
            self._closing = True
            self._has_work.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            left = self.stats().queued
            logger.error(
                "x cdr %s: close timed out after %.1fs with %d CDRs unwritten",
                self.path,
                timeout,
                left,
            )
        else:
            logger.info("- cdr %s: closed (%s)", self.path, self.stats())

    # -- the writer thread --------------------------------------------------------

    def _start(self) -> None:
        self._thread.start()

    def _first(self, kind: str, message: str) -> str | None:
        """``message`` the first time ``kind`` fails since the last success, else None.

        Called with ``_lock`` held.
        """
        if kind in self._logged:
            return None
        self._logged.add(kind)
        return message

    def _run(self) -> None:
        self._try_open(lost=0)
        while True:
            with self._lock:
                self._has_work.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    break
                if len(self._pending) < self._batch_size and not self._closing:
                    # Gather what the next moments bring into the same transaction;
                    # close(), flush() and a full batch cut this short.
                    self._has_work.wait(BATCH_LINGER)
                count = min(self._batch_size, len(self._pending))
                batch = [self._pending.popleft() for _ in range(count)]
                self._in_flight = count
            self._write_safely(batch)
            with self._lock:
                self._in_flight = 0
                if not self._pending:
                    self._overflowing = False
                    self._idle.notify_all()
        self._release_safely()
        with self._lock:
            self._idle.notify_all()

    def _try_open(self, lost: int) -> bool:
        """Open the store unless it is open; on failure the ``lost`` records are dropped."""
        if self._open_ok:
            return True
        try:
            self._open()
        except Exception as exc:
            self._release_safely()
            self._failed("open", exc, lost)
            return False
        self._open_ok = True
        logger.info("- cdr %s: open", self.path)
        return True

    def _write_safely(self, batch: list[CdrRecord]) -> None:
        rows = []
        for record in batch:
            try:
                rows.append(self._encode(record))
            except Exception as exc:
                # A record that cannot be encoded is the caller's bug: lose it alone.
                self._failed("encode", exc, 1)
        if not rows:
            return
        if not self._try_open(lost=len(rows)):
            return
        try:
            self._write_batch(rows)
        except Exception as exc:
            # Reopen for the next batch: the file may have been replaced or remounted.
            self._open_ok = False
            self._release_safely()
            self._failed("write", exc, len(rows))
            return
        with self._lock:
            self._written += len(rows)
            self._batches += 1
            recovered = bool(self._logged - {"closed"})
            self._logged &= {"closed"}
            dropped = self._dropped
        if recovered:
            logger.info("- cdr %s: writing again (%d CDRs dropped so far)", self.path, dropped)

    def _failed(self, stage: str, exc: BaseException, lost: int) -> None:
        kind = _failure_kind(exc)
        with self._lock:
            self._errors += 1
            self._dropped += lost
            # One message per kind, not per stage: a locked or full database fails the
            # reopen as it failed the write, and says nothing new the second time.
            message = self._first(kind, f"{stage} failed ({kind}): {exc}")
        if message is not None:
            logger.error("x cdr %s: %s; dropping CDRs until it works again", self.path, message)

    def _release_safely(self) -> None:
        try:
            self._release()
        except Exception as exc:
            logger.debug("x cdr %s: release: %s", self.path, exc)

    # -- what subclasses do, in the writer thread ------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _encode(self, record: CdrRecord) -> Any:
        raise NotImplementedError

    def _write_batch(self, rows: list[Any]) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


# --- SQLite --------------------------------------------------------------------------


class CdrStore(_QueuedSink):
    """CDRs in an SQLite database (WAL mode), one row per call attempt.

    The file, its tables (``schema_version``, ``cdr``) and indexes are created by the
    writer thread as it starts; a database of another schema version is left alone
    and counted as a failure. See docs/cdr.md for the columns.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        super().__init__(path, max_queue=max_queue, batch_size=batch_size)
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._start()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        self._conn = conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("x cdr %s: journal mode is %s, not WAL", self.path, mode)
        # WAL + NORMAL: a commit survives an SBC crash; only a power cut may lose the
        # last batches. Enough for CDRs, and no fsync per batch.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _CREATE_STATEMENTS:
                conn.execute(statement)
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] in _UPGRADES:
                _upgrade(conn, row[0])
                logger.info(
                    "- cdr %s: schema upgraded from %d to %d", self.path, row[0], SCHEMA_VERSION
                )
            elif row[0] != SCHEMA_VERSION:
                raise _SchemaMismatch(
                    f"database has schema version {row[0]}, this SBC writes {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL): a ROLLBACK then
            # fails and would hide the error worth logging.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _encode(self, record: CdrRecord) -> tuple[Any, ...]:
        # SQLite takes UTF-8 only: text from the wire may hold octets that are not
        # (surrogateescape), and one such value would fail the whole batch.
        return tuple(
            value if not isinstance(value, str) else _storable(value)
            for value in record_to_row(record)
        )

    def _write_batch(self, rows: list[Any]) -> None:
        conn = self._conn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- readers (blocking; any thread) -------------------------------------------

    def recent(self, limit: int = 100) -> list[CdrRecord]:
        """The last ``limit`` CDRs written (at most :data:`MAX_RECENT`), newest first."""
        if limit < 1:
            raise ValueError(f"limit {limit} is not positive")
        return self._select(" ORDER BY id DESC LIMIT ?", (min(limit, MAX_RECENT),))

    def by_call_ref(self, ref: str) -> CdrRecord | None:
        """The CDR of call ``ref`` (the last written if there are several), or None."""
        found = self._select(" WHERE call_ref = ? ORDER BY id DESC LIMIT 1", (ref,))
        return found[0] if found else None

    def _select(self, where: str, params: tuple[Any, ...]) -> list[CdrRecord]:
        if not self.path.is_file():
            return []
        try:
            # mode=rw: a reader never creates the file; query_only: nor writes to it.
            conn = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=self._busy_timeout,
            )
        except sqlite3.Error as exc:
            raise CdrReadError(f"cdr database {self.path}: {exc}") from exc
        try:
            conn.execute("PRAGMA query_only=ON")
            tables = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'cdr'"
            ).fetchone()[0]
            if not tables:
                return []
            rows = conn.execute(_SELECT + where, params).fetchall()
        except sqlite3.Error as exc:
            raise CdrReadError(f"cdr database {self.path}: {exc}") from exc
        finally:
            conn.close()
        try:
            return [record_from_row(row) for row in rows]
        except CdrError as exc:
            raise CdrReadError(f"cdr database {self.path}: {exc}") from exc


# --- JSON lines ------------------------------------------------------------------------


class JsonLinesCdrStore(_QueuedSink):
    """CDRs appended to a text file, one ``to_dict`` JSON object per line.

    Text is written as the SQLite store stores it: valid UTF-8, with octets that
    were not UTF-8 as U+FFFD and other lone surrogates as ``?``.

    Each batch is flushed to the file; ``close`` also fsyncs it. After a failed write
    the file is reopened, so a partial last line (disk full) may precede the next
    record: readers should skip lines that do not parse.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        super().__init__(path, max_queue=max_queue, batch_size=batch_size)
        self._file: TextIO | None = None
        self._start()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open

    def _encode(self, record: CdrRecord) -> str:
        # RFC 8259 8.1: JSON text is UTF-8. A lone surrogate (an octet that was not
        # UTF-8, kept by surrogateescape) would be written as a "\udcff" escape that
        # strict readers refuse: the same replacement as the SQLite store's.
        data = {
            key: _storable(value) if isinstance(value, str) else value
            for key, value in record.to_dict().items()
        }
        return json.dumps(data, separators=(",", ":"), allow_nan=False) + "\n"

    def _write_batch(self, rows: list[Any]) -> None:
        assert self._file is not None
        self._file.write("".join(rows))
        self._file.flush()

    def _release(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
