"""The one nftables table the SBC owns, ``inet sbc``.

The firewall and the media kernel path each keep their objects in it, through
their own libnftables context; both must agree on its name and on how to tell that
it is still there (``nft flush ruleset`` takes it away with everything else).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

TABLE_FAMILY: Final = "inet"
TABLE_NAME: Final = "sbc"
#: As nft's text commands spell it: ``add element inet sbc ...``.
TABLE: Final = f"{TABLE_FAMILY} {TABLE_NAME}"
#: ``nft list`` of the family's tables, which fetches no set elements (a table
#: listing fetches them all, and grows with the blacklist and the kernel path's
#: forwards).
TABLES: Final = f"tables {TABLE_FAMILY}"


def table_listed(listing: Mapping[str, Any] | None) -> bool:
    """Whether the JSON listing of `TABLES` names the SBC's table."""
    items = (listing or {}).get("nftables", [])
    return any(item.get("table", {}).get("name") == TABLE_NAME for item in items)
