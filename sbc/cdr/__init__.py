"""Call detail records: one per call attempt, written off the event loop.

:class:`CdrRecord` is the value the B2BUA builds when a call ends; a :class:`CdrSink`
(:class:`CdrStore` for SQLite, :class:`JsonLinesCdrStore` for JSON lines) takes it.
docs/cdr.md documents the database for operators.
"""

from sbc.cdr.record import (
    CDR_DICT_VERSION,
    CdrError,
    CdrRecord,
    Disposition,
    EndReason,
    HangupSide,
    disposition_for,
)
from sbc.cdr.store import (
    COLUMNS,
    SCHEMA_VERSION,
    CdrReadError,
    CdrSink,
    CdrStats,
    CdrStore,
    JsonLinesCdrStore,
)

__all__ = [
    "CDR_DICT_VERSION",
    "COLUMNS",
    "SCHEMA_VERSION",
    "CdrError",
    "CdrReadError",
    "CdrRecord",
    "CdrSink",
    "CdrStats",
    "CdrStore",
    "Disposition",
    "EndReason",
    "HangupSide",
    "JsonLinesCdrStore",
    "disposition_for",
]
