"""The thin layer that talks to the kernel, through libnftables (no `nft` processes).

Rulesets go in as native nft text (one `cmd()` call is one atomic transaction, as
with `nft -f`); listings come back as JSON. Native text is used for writing because
libnftables 1.0.6's JSON parser rejects the `dynamic` set flag the meters need.
"""

from __future__ import annotations

import ctypes
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from sbc.nft_table import TABLE, TABLES, table_listed

log = logging.getLogger(__name__)


class NftError(RuntimeError):
    """libnftables refused a command; `detail` is its error output."""

    def __init__(self, action: str, detail: str) -> None:
        super().__init__(f"nftables {action} failed: {detail.strip()}")
        self.action = action
        self.detail = detail


class NftUnavailableError(NftError):
    """libnftables or its Python binding is not installed."""


@dataclass(frozen=True)
class CounterValue:
    packets: int
    bytes: int


class Kernel(Protocol):
    """What the firewall needs from the kernel; `NftBackend` is the real one."""

    def run(self, text: str, *, check: bool = False) -> None: ...

    def list_table(self) -> dict[str, Any] | None: ...

    def list_set(self, name: str) -> list[dict[str, Any]] | None: ...

    def counters(self) -> dict[str, CounterValue]: ...

    def table_present(self) -> bool: ...


class NftBackend:
    """libnftables through its Python binding (Debian python3-nftables or PyPI pip-nftables)."""

    def __init__(self) -> None:
        try:
            import nftables  # type: ignore[import-untyped]
        except ImportError as exc:  # pragma: no cover - depends on the host
            raise NftUnavailableError(
                "import", "the nftables Python binding is missing (python3-nftables / pip-nftables)"
            ) from exc
        self._module = nftables
        #: One libnftables context is not for two threads at once: the SBC opens
        #: media pinholes from a worker thread while bans happen on the event loop.
        self._lock = threading.Lock()
        try:
            self._nft = nftables.Nftables()
        except OSError as exc:  # pragma: no cover - depends on the host
            raise NftUnavailableError("load", f"libnftables.so.1: {exc}") from exc
        self._set_dry_run_c: Any = None
        if not hasattr(self._nft, "set_dry_run"):
            # pip-nftables 1.0.2 predates set_dry_run(); libnftables has had
            # nft_ctx_set_dry_run() since 0.9.1, so call it on the binding's context.
            lib = ctypes.CDLL("libnftables.so.1")
            self._set_dry_run_c = lib.nft_ctx_set_dry_run
            self._set_dry_run_c.argtypes = [ctypes.c_void_p, ctypes.c_bool]
            self._set_dry_run_c.restype = None

    def _checker(self) -> Any:
        # A context of its own per check: after a dry run, libnftables' cache
        # believes the checked objects exist, and the real apply on the same
        # context then fails with "File exists" (seen with 1.0.6 and interval sets).
        nft = self._module.Nftables()
        if self._set_dry_run_c is None:
            nft.set_dry_run(True)
        else:
            self._set_dry_run_c(nft._Nftables__ctx, True)
        return nft

    def _cmd(self, text: str, action: str, nft: Any = None) -> str:
        rc, output, error = (nft or self._nft).cmd(text)
        if rc != 0:
            raise NftError(action, error or f"rc {rc}")
        return str(output)

    def run(self, text: str, *, check: bool = False) -> None:
        """Apply `text` as one transaction; with `check`, only validate it (`nft -c`)."""
        if not text.strip():
            return
        if check:
            self._cmd(text, "check", self._checker())
            return
        with self._lock:
            self._nft.set_json_output(False)
            self._cmd(text, "apply")

    def _list_json(self, what: str) -> dict[str, Any] | None:
        with self._lock:
            self._nft.set_json_output(True)
            try:
                rc, output, error = self._nft.cmd(f"list {what}")
            finally:
                self._nft.set_json_output(False)
        if rc != 0:
            if "No such file or directory" in error:
                return None
            raise NftError(f"list {what}", error)
        data: dict[str, Any] = json.loads(output)
        return data

    def list_table(self) -> dict[str, Any] | None:
        """`list table inet sbc` as JSON, or None when the table does not exist."""
        return self._list_json(f"table {TABLE}")

    def table_present(self) -> bool:
        """Whether table inet sbc exists: `list tables`, which fetches no set
        elements (a table listing does, and grows with the blacklist)."""
        return table_listed(self._list_json(TABLES))

    def list_set(self, name: str) -> list[dict[str, Any]] | None:
        """The elements of one set of the table (JSON `elem` items), None if missing."""
        data = self._list_json(f"set {TABLE} {name}")
        if data is None:
            return None
        for item in data.get("nftables", []):
            if "set" in item:
                elements: list[dict[str, Any]] = item["set"].get("elem", [])
                return elements
        return []

    def counters(self) -> dict[str, CounterValue]:
        """Every named counter of the table (the media relay's too)."""
        data = self._list_json(f"counters table {TABLE}")
        if data is None:
            return {}
        out: dict[str, CounterValue] = {}
        for item in data.get("nftables", []):
            counter = item.get("counter")
            if counter is not None:
                out[counter["name"]] = CounterValue(counter["packets"], counter["bytes"])
        return out
