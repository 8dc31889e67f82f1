#!/bin/bash
# mmdebstrap customize hook: turn a freshly installed Debian tree ($1) into the SBC
# appliance. Runs on the host as root; commands inside use chroot.
set -euo pipefail
root="${1:?root directory}"
# A clean environment: nothing of the host (PIP_*, locales) leaks into the image.
inroot() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# The SBC: an unprivileged system user, a venv on Debian's python3, installed offline.
inroot groupadd --system sbc
inroot useradd --system --gid sbc --home-dir /var/lib/sbc --no-create-home \
    --shell /usr/sbin/nologin --comment "Session border controller" sbc
inroot python3 -m venv /opt/sbc/venv
inroot /opt/sbc/venv/bin/python -m pip install -q --no-index --no-cache-dir \
    --find-links /tmp/sbc-wheels sbc
rm -rf "$root/tmp/sbc-wheels"
inroot /opt/sbc/venv/bin/sbc --version
chmod 0640 "$root/etc/sbc/sbc.yaml"
inroot chown root:sbc /etc/sbc /etc/sbc/sbc.yaml
chmod 0750 "$root/etc/sbc"

# The operator's account: console login with the first-boot password, SSH by key only.
inroot groupadd --system sbcadmin
inroot useradd --create-home --shell /bin/bash --groups sudo,adm,systemd-journal,sbcadmin \
    --comment "SBC administrator" admin
inroot passwd --lock admin >/dev/null
inroot passwd --lock root >/dev/null
if [ -n "${SBC_AUTHORIZED_KEYS:-}" ]; then
    install -d -m 0700 "$root/home/admin/.ssh"
    printf '%s\n' "$SBC_AUTHORIZED_KEYS" > "$root/home/admin/.ssh/authorized_keys"
    chmod 0600 "$root/home/admin/.ssh/authorized_keys"
    inroot chown -R admin:admin /home/admin/.ssh
fi

echo "${SBC_HOSTNAME:-sbc}" > "$root/etc/hostname"
cat > "$root/etc/hosts" <<HOSTS
127.0.0.1	localhost
127.0.1.1	${SBC_HOSTNAME:-sbc}.localdomain ${SBC_HOSTNAME:-sbc}
::1	localhost ip6-localhost ip6-loopback
HOSTS

# Services: SBC, first boot, networkd, timesyncd, ssh. Keepalived, Redis and coturn are
# installed but off until Ansible configures an HA pair / TURN (no unneeded services).
inroot systemctl enable sbc.service sbc-firstboot.service systemd-networkd.service \
    systemd-timesyncd.service ssh.service nftables.service
inroot systemctl disable redis-server.service coturn.service keepalived.service 2>/dev/null || true
inroot systemctl mask systemd-networkd-wait-online.service
# Debian's SSH host keys are per image: the first boot makes per-host ones.
rm -f "$root"/etc/ssh/ssh_host_*
# A per-host machine id (systemd writes one on first boot).
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# Restrictive defaults: umask 027 for logins, no world-readable homes.
sed -i 's/^UMASK.*/UMASK\t\t027/' "$root/etc/login.defs"
sed -i 's/^PASS_MAX_DAYS.*/PASS_MAX_DAYS\t365/; s/^PASS_MIN_DAYS.*/PASS_MIN_DAYS\t1/' "$root/etc/login.defs"
grep -q '^SHA_CRYPT_MIN_ROUNDS' "$root/etc/login.defs" || \
    printf 'SHA_CRYPT_MIN_ROUNDS 10000\nSHA_CRYPT_MAX_ROUNDS 100000\n' >> "$root/etc/login.defs"
chmod 0750 "$root/home/admin"
banner='Authorized access only. Unauthorized access is prohibited; all activity is
monitored and logged, and logs may be used as evidence under applicable law.'
printf '%s\n' "$banner" > "$root/etc/issue.net"
printf 'SBC appliance \\n (\\l).\n%s\n\n' "$banner" > "$root/etc/issue"
cp "$root/etc/issue.net" "$root/etc/motd"
# sysstat collects (lynis ACCT-9626).
sed -i "s/^ENABLED=.*/ENABLED=\"true\"/" "$root/etc/default/sysstat" 2>/dev/null || true
# needrestart needs binutils, which brings an assembler: root only (lynis HRDN-7222),
# kept across upgrades by a dpkg statoverride.
for compiler in /usr/bin/x86_64-linux-gnu-as; do
    [ -e "$root$compiler" ] && inroot dpkg-statoverride --update --add root root 0750 "$compiler"
done
# Journald's persistent directory.
install -d -m 2755 -g systemd-journal "$root/var/log/journal" 2>/dev/null || \
    install -d -m 2755 "$root/var/log/journal"
# No apt caches in the image.
inroot apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
