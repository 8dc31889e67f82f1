#!/bin/bash
# Turn the SBC root filesystem into a GPT disk image that boots with BIOS and UEFI,
# without loop devices, partprobe or mounts: sfdisk on a file, mkfs.ext4 -d and
# mkfs.fat at partition offsets, GRUB images written at known sectors.
#
#   packer/scripts/make-disk.sh ROOTFS_DIR OUT.raw SIZE_MIB "KERNEL CMDLINE"
#
# Layout (512-byte sectors):
#   p1  BIOS boot    2048 +  1 MiB  GRUB core.img (i386-pc), found by the MBR boot.img
#   p2  ESP          4096 + 64 MiB  FAT16, \EFI\BOOT\BOOTX64.EFI (standalone GRUB)
#   p3  root       135168 .. end    ext4 "sbc-root", GPT type root-x86-64
# Both GRUBs find the root by filesystem UUID and read /boot/grub/grub.cfg from it.
set -euo pipefail
for fd in 3 4 5 6 7 8 9 10; do eval "exec $fd>&-" 2>/dev/null || true; done

rootfs="${1:?usage: make-disk.sh ROOTFS_DIR OUT.raw SIZE_MIB CMDLINE}"
out="${2:?output image}"
size_mib="${3:?size in MiB}"
cmdline="${4:-console=tty0 console=ttyS0,115200n8}"
grub_lib=/usr/lib/grub

SECTOR=512
BIOS_START=2048; BIOS_SECTORS=2048
ESP_START=4096;  ESP_SECTORS=131072
ROOT_START=135168
total_sectors=$(( size_mib * 1024 * 1024 / SECTOR ))
# The backup GPT takes the last 33 sectors; keep the root partition 1 MiB aligned.
root_sectors=$(( (total_sectors - 34 - ROOT_START) / 2048 * 2048 ))
(( root_sectors > 0 )) || { echo "x make-disk: $size_mib MiB is too small" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root_uuid="$(cat /proc/sys/kernel/random/uuid)"
kver="$(basename "$(ls -1 "$rootfs"/boot/vmlinuz-* | sort -V | tail -n1)" | sed 's/^vmlinuz-//')"
[ -n "$kver" ] || { echo "x make-disk: no kernel in $rootfs/boot" >&2; exit 1; }

echo "- make-disk: kernel $kver, root UUID $root_uuid, $size_mib MiB"

# Boot configuration inside the root filesystem. The GRUB menu is locked with a random
# superuser password nobody knows (no editing of the kernel command line at the
# console); the appliance entry itself boots unrestricted.
pw="$(head -c 24 /dev/urandom | base64)"
grub_pw_hash="$(printf '%s\n%s\n' "$pw" "$pw" | grub-mkpasswd-pbkdf2 2>/dev/null | sed -n 's/.*is \(grub\.pbkdf2\..*\)$/\1/p')"
unset pw
[ -n "$grub_pw_hash" ] || { echo "x make-disk: grub-mkpasswd-pbkdf2 failed" >&2; exit 1; }
install -d "$rootfs/boot/grub"
cat > "$rootfs/boot/grub/grub.cfg" <<CFG
# Written by packer/scripts/make-disk.sh; root filesystem UUID $root_uuid
set timeout=1
set default=0
set superusers="root"
password_pbkdf2 root $grub_pw_hash
serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1
terminal_input console serial
terminal_output console serial
menuentry "SBC appliance" --unrestricted {
    linux /boot/vmlinuz-$kver root=UUID=$root_uuid ro $cmdline
    initrd /boot/initrd.img-$kver
}
CFG
chmod 0600 "$rootfs/boot/grub/grub.cfg"
cat > "$rootfs/etc/fstab" <<FSTAB
# <file system>  <mount point>  <type>  <options>  <dump>  <pass>
UUID=$root_uuid  /  ext4  defaults,errors=remount-ro  0  1
tmpfs  /tmp  tmpfs  nosuid,nodev,size=256M,mode=1777  0  0
tmpfs  /dev/shm  tmpfs  nosuid,nodev,noexec,mode=1777  0  0
FSTAB

# Early configuration embedded in both GRUB images: find the root, hand over to grub.cfg.
cat > "$work/early.cfg" <<CFG
search --no-floppy --fs-uuid --set=root $root_uuid
set prefix=(\$root)/boot/grub
configfile (\$root)/boot/grub/grub.cfg
CFG
modules="part_gpt ext2 search search_fs_uuid configfile normal linux echo test serial terminal boot password_pbkdf2 sleep"
grub-mkimage -O i386-pc -o "$work/core.img" -c "$work/early.cfg" -p /boot/grub \
    biosdisk $modules
grub-mkstandalone -O x86_64-efi -o "$work/bootx64.efi" --modules="$modules fat" \
    --locales= --themes= --fonts= "boot/grub/grub.cfg=$work/early.cfg"
core_sectors=$(( ($(stat -c %s "$work/core.img") + SECTOR - 1) / SECTOR ))
(( core_sectors <= BIOS_SECTORS )) || { echo "x make-disk: core.img too big" >&2; exit 1; }

# The disk: a sparse file with a GPT.
rm -f "$out"
truncate -s "$(( total_sectors * SECTOR ))" "$out"
sfdisk --quiet --no-reread --no-tell-kernel "$out" <<PT
label: gpt
unit: sectors
first-lba: 2048
start=$BIOS_START, size=$BIOS_SECTORS, type=21686148-6449-6E6F-744E-656564454649, name="bios-boot"
start=$ESP_START, size=$ESP_SECTORS, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="esp"
start=$ROOT_START, size=$root_sectors, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name="sbc-root"
PT

# Root filesystem straight from the directory (mkfs.ext4 -d), at the partition offset.
mkfs.ext4 -q -F -L sbc-root -U "$root_uuid" -d "$rootfs" \
    -E "offset=$(( ROOT_START * SECTOR ))" "$out" "$(( root_sectors / 2 ))k"

# ESP: FAT16 at its offset, filled with mtools.
mkfs.fat -F 16 -n SBC-ESP --offset="$ESP_START" "$out" "$(( ESP_SECTORS / 2 ))" >/dev/null
esp="$out@@$(( ESP_START * SECTOR ))"
mmd -i "$esp" ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$work/bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI

# BIOS: what grub-install would do on a device (grub-setup). boot.img in the MBR code
# area (the protective MBR's partition table stays), pointing at core.img in p1;
# core.img's first blocklist pointing at the rest of itself.
python3 - "$out" "$grub_lib/i386-pc/boot.img" "$work/core.img" "$BIOS_START" <<'PY'
import struct, sys
disk, boot_img, core_img, core_lba = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
boot = bytearray(open(boot_img, "rb").read())
core = bytearray(open(core_img, "rb").read())
# GRUB_BOOT_MACHINE_KERNEL_SECTOR (0x5c): LBA of core.img's first sector.
struct.pack_into("<Q", boot, 0x5C, core_lba)
# GRUB_BOOT_MACHINE_DRIVE_CHECK (0x66): a hard disk; nop the floppy-probe jump.
boot[0x66:0x68] = b"\x90\x90"
# diskboot.img's first blocklist entry (12 bytes before offset 0x200): start LBA of the
# rest of core.img; grub-mkimage already filled in its length.
start_off = 0x200 - 12
assert struct.unpack_from("<Q", core, start_off)[0] == 2, "unexpected diskboot.img"
struct.pack_into("<Q", core, start_off, core_lba + 1)
with open(disk, "r+b") as f:
    f.seek(0)
    f.write(boot[:440])  # keep disk signature and protective MBR partition table
    f.seek(core_lba * 512)
    f.write(core)
PY
echo "- make-disk: $out"
