# Lab VM (QEMU/KVM, libvirt, the boot test): serial console last, so first-boot
# messages (the admin password) go to ttyS0; a small disk, qcow2 is what VMs use.
image_name     = "sbc-lab-vm"
disk_size_mib  = 2048
hostname       = "sbc"
kernel_cmdline = "console=tty0 console=ttyS0,115200n8"
zstd_level     = 10
