# SBC appliance image: rootfs (mmdebstrap) -> GPT raw disk (BIOS + UEFI) -> .raw.zst,
# .qcow2 and SHA256SUMS. Debian's packer 1.6.6 with built-in components only (the null
# builder and shell-local): no plugins, no `packer init`, works offline once the wheels
# are built.
#
#   packer build -var-file=packer/targets/lab-vm.pkrvars.hcl \
#       -var project_dir=$PWD -var output_dir=$PWD/build/image packer/sbc.pkr.hcl
#
# `make image` (mk/image.mk) does exactly this.

variable "project_dir" {
  type        = string
  description = "Absolute path of the SBC source tree (the wheel is built from it)."
}

variable "output_dir" {
  type        = string
  description = "Absolute path of the output directory; it is emptied first."
}

variable "python" {
  type        = string
  default     = "/usr/bin/python3"
  description = "A Python 3.11 with pip on the build host, used to build the SBC wheel and fetch its dependencies' wheels from PyPI."
}

variable "image_name" {
  type        = string
  description = "Base name of the image files (NAME.raw, NAME.raw.zst, NAME.qcow2)."
}

variable "apt_sources" {
  type        = string
  default     = "/etc/apt/sources.list.d/debian.sources"
  description = "deb822 apt sources file mmdebstrap installs from (packages only, no other download)."
}

variable "apt_cache_dir" {
  type        = string
  default     = ""
  description = "Directory keeping downloaded .debs between builds (empty = no cache)."
}

variable "suite" {
  type        = string
  default     = "bookworm"
  description = "Debian suite of the root filesystem."
}

variable "disk_size_mib" {
  type        = number
  description = "Size of the raw disk image in MiB (the root partition takes all but 66 MiB)."
}

variable "hostname" {
  type        = string
  default     = "sbc"
  description = "Hostname written into the image (Ansible renames the nodes of an HA pair)."
}

variable "kernel_cmdline" {
  type        = string
  description = "Kernel command line after root=; the LAST console= is where first-boot messages (the admin password) appear."
}

variable "ssh_authorized_keys" {
  type        = string
  default     = ""
  description = "SSH public keys (newline separated) for the admin account; empty = console login only until keys are added."
}

variable "zstd_level" {
  type        = number
  default     = 10
  description = "zstd compression level of NAME.raw.zst (1-19)."
}

locals {
  rootfs = "${var.output_dir}/rootfs"
  wheels = "${var.output_dir}/wheels"
  raw    = "${var.output_dir}/${var.image_name}.raw"
}

source "null" "sbc" {
  communicator = "none"
}

build {
  sources = ["source.null.sbc"]

  # 1. The SBC and its dependencies as wheels, on the host (the guest never downloads).
  provisioner "shell-local" {
    inline = [
      "set -eu",
      "rm -rf '${local.rootfs}' '${local.wheels}' '${var.output_dir}/${var.image_name}'.* '${var.output_dir}/SHA256SUMS'",
      "mkdir -p '${local.wheels}'",
      "'${var.python}' -m pip wheel -q --no-cache-dir -w '${local.wheels}' '${var.project_dir}'",
    ]
  }

  # 2. Root filesystem from Debian packages + the wheels + the hardening overlay.
  provisioner "shell-local" {
    environment_vars = [
      "SBC_HOSTNAME=${var.hostname}",
      "SBC_SUITE=${var.suite}",
      "SBC_AUTHORIZED_KEYS=${var.ssh_authorized_keys}",
      "SBC_APT_CACHE=${var.apt_cache_dir}",
    ]
    inline = [
      "'${var.project_dir}/rootfs/build-rootfs.sh' '${local.rootfs}' '${local.wheels}' '${var.apt_sources}'",
    ]
  }

  # 3. GPT disk image, BIOS + UEFI, without loop devices.
  provisioner "shell-local" {
    inline = [
      "'${var.project_dir}/packer/scripts/make-disk.sh' '${local.rootfs}' '${local.raw}' '${var.disk_size_mib}' '${var.kernel_cmdline}'",
    ]
  }

  # 4. Distribution formats and checksums.
  provisioner "shell-local" {
    inline = [
      "set -eu",
      "for fd in 3 4 5 6 7 8 9; do eval \"exec $fd>&-\"; done",
      "zstd -q -f -T0 -${var.zstd_level} '${local.raw}' -o '${local.raw}.zst'",
      "qemu-img convert -f raw -O qcow2 -c '${local.raw}' '${var.output_dir}/${var.image_name}.qcow2'",
      "cd '${var.output_dir}' && sha256sum --binary '${var.image_name}.raw' '${var.image_name}.raw.zst' '${var.image_name}.qcow2' > SHA256SUMS",
      "cd '${var.output_dir}' && ls -l '${var.image_name}'.* SHA256SUMS",
    ]
  }
}
