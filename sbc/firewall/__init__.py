"""Edge defence: the SBC's nftables table `inet sbc` and the detectors feeding it.

- `config`: the `firewall:` section (frozen dataclasses);
- `ruleset`: pure rendering of config to one nftables transaction;
- `detectors`: pure detectors (`observe(event, now) -> [BanDecision]`) and `Guard`;
- `bans`, `blacklist`: bans, escalation and the persisted blacklist;
- `nft`: the thin libnftables backend; `firewall`: the run-time shell;
- `cli`: `sbc ban list|add|remove`.
"""

from sbc.firewall.bans import Ban, BanTarget, BlacklistStore, ban_target
from sbc.firewall.blacklist import BanListing, Blacklist, TrustedTargetError
from sbc.firewall.config import FirewallConfig
from sbc.firewall.detectors import (
    AuthFailed,
    BanDecision,
    BanReason,
    Guard,
    MalformedMessage,
    RequestSeen,
)
from sbc.firewall.firewall import Firewall, FirewallStats
from sbc.firewall.ruleset import DropReason, TableInventory, render_apply, render_teardown

__all__ = [
    "AuthFailed",
    "Ban",
    "BanDecision",
    "BanListing",
    "BanReason",
    "BanTarget",
    "Blacklist",
    "BlacklistStore",
    "DropReason",
    "Firewall",
    "FirewallConfig",
    "FirewallStats",
    "Guard",
    "MalformedMessage",
    "RequestSeen",
    "TableInventory",
    "TrustedTargetError",
    "ban_target",
    "render_apply",
    "render_teardown",
]
