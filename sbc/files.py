"""Files the admin commands create for the running SBC."""

from __future__ import annotations

import os
from pathlib import Path


def directory_owner(path: Path) -> tuple[int, int] | None:
    """Who a file root creates at ``path`` should belong to: the owner of its
    directory, when root runs this and the directory is not root's; else None.

    On the appliance the SBC runs as the ``sbc`` user and reads its state
    directory (``/var/lib/sbc``); ``sudo sbc user add`` or ``sudo sbc ban add``
    would otherwise leave root-owned files (mode 0600) the SBC cannot open.
    """
    if os.geteuid() != 0:
        return None
    owner = path.parent.stat()
    if owner.st_uid == 0 and owner.st_gid == 0:
        return None
    return owner.st_uid, owner.st_gid


def give_to_directory_owner(path: Path) -> None:
    """A file root just created belongs to whoever owns its directory."""
    owner = directory_owner(path)
    if owner is not None:
        os.chown(path, *owner)
