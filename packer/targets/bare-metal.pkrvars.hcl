# Bare-metal DMZ host: flash NAME.raw (or NAME.raw.zst) with packer/flash.sh. The VGA
# console is last, so the admin password appears on the screen; ttyS0 still gets the
# kernel log for a serial console server. Room for journals and CDRs.
image_name     = "sbc-bare-metal"
disk_size_mib  = 4096
hostname       = "sbc"
kernel_cmdline = "console=ttyS0,115200n8 console=tty0 quiet"
zstd_level     = 19
