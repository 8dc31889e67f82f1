#!/bin/bash
# Build the SBC appliance root filesystem with mmdebstrap, from Debian packages only
# (the host's configured apt sources), plus the SBC wheel and its PyPI dependencies
# installed offline into /opt/sbc/venv on Debian's python3.
#
#   rootfs/build-rootfs.sh OUT_DIR WHEEL_DIR [APT_SOURCES]
#
# OUT_DIR must not exist (it is the new root). WHEEL_DIR holds the sbc wheel and the
# wheels of its dependencies (`pip wheel -w WHEEL_DIR PROJECT`). Runs as root.
# Environment: SBC_HOSTNAME (default sbc), SBC_AUTHORIZED_KEYS (SSH public keys for the
# admin account, newline separated; default none), SBC_SUITE (default bookworm),
# SBC_APT_CACHE (a directory keeping downloaded .debs between builds; default none).
set -euo pipefail
# Packer 1.6.6 leaks open descriptors into shell-local steps; mmdebstrap then fails
# with "Bad fd number". Close them.
for fd in 3 4 5 6 7 8 9 10; do eval "exec $fd>&-" 2>/dev/null || true; done

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build-rootfs.sh OUT_DIR WHEEL_DIR [APT_SOURCES]}"
wheels="$(cd "${2:?wheel directory}" && pwd)"
sources="${3:-/etc/apt/sources.list.d/debian.sources}"
suite="${SBC_SUITE:-bookworm}"
export SBC_HOSTNAME="${SBC_HOSTNAME:-sbc}"
export SBC_AUTHORIZED_KEYS="${SBC_AUTHORIZED_KEYS:-}"

[ "$(id -u)" = 0 ] || { echo "x build-rootfs: needs root" >&2; exit 1; }
[ ! -e "$out" ] || { echo "x build-rootfs: $out exists" >&2; exit 1; }
ls "$wheels"/sbc-*.whl >/dev/null || { echo "x build-rootfs: no sbc wheel in $wheels" >&2; exit 1; }

# Optional cache of downloaded .debs between builds (SBC_APT_CACHE=DIR): a rebuild then
# downloads only what changed on the mirror.
cache_hooks=()
if [ -n "${SBC_APT_CACHE:-}" ]; then
    mkdir -p "$SBC_APT_CACHE"
    cache="$(cd "$SBC_APT_CACHE" && pwd)"
    cache_hooks=(--skip=essential/unlink
        --setup-hook="mkdir -p \"\$1/var/cache/apt/archives/\""
        --setup-hook="sync-in '$cache' /var/cache/apt/archives/"
        --customize-hook="sync-out /var/cache/apt/archives '$cache'")
fi

include="$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages.txt" | tr -s '[:space:]' ',' | sed 's/,$//')"

# Documentation, man pages and translations are not needed on an appliance.
mmdebstrap --mode=root --variant=apt --format=directory \
    --include="$include" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "${cache_hooks[@]}" \
    --customize-hook="mkdir -p \"\$1/tmp/sbc-wheels\" && cp -a '$wheels'/. \"\$1/tmp/sbc-wheels/\"" \
    --customize-hook="cp -a '$here/overlay'/. \"\$1\"/" \
    --customize-hook="'$here/customize.sh' \"\$1\"" \
    "$suite" "$out" "$sources"
echo "- build-rootfs: $out ($(du -sh --apparent-size "$out" | cut -f1))"
