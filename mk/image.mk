# Appliance image: build (Packer), boot test and hardening checks, flashing.
# Included from the Makefile (`include mk/image.mk`); uses its BIN and deps.
#
#   make image [IMAGE_TARGET=lab-vm|bare-metal]   rootfs -> raw, raw.zst, qcow2, SHA256SUMS
#   make test-image                                fast checks, then build (if stale) + boot test
#   make flash DEVICE=/dev/sdX [IMAGE_TARGET=bare-metal] [FLASH_YES=1]

IMAGE_TARGET ?= lab-vm
IMAGE_DIR ?= build/image/$(IMAGE_TARGET)
IMAGE_NAME = sbc-$(IMAGE_TARGET)
IMAGE_APT_CACHE ?= build/apt-cache
IMAGE_APT_PACKAGES := mmdebstrap packer qemu-system-x86 qemu-utils ovmf \
	grub-pc-bin grub-efi-amd64-bin grub-common fdisk dosfstools mtools e2fsprogs \
	zstd openssl systemd systemd-container lynis iproute2
# Everything the image is made of: a change to any of these rebuilds it.
IMAGE_INPUTS := $(shell find rootfs packer/sbc.pkr.hcl packer/scripts packer/targets sbc \
	-type f -not -name '*.pyc' 2>/dev/null) pyproject.toml

.PHONY: image image-deps test-image test-image-fast test-image-slow flash

image-deps:
	@$(SHELL) mk/apt-install $(IMAGE_APT_PACKAGES)

# Packer 1.6.6 from Debian, built-in null builder + shell-local only: no plugin download.
$(IMAGE_DIR)/SHA256SUMS: $(IMAGE_INPUTS) | deps image-deps
	@mkdir -p $(IMAGE_DIR) build/packer_cache
	@start=$$(date +%s); \
	CHECKPOINT_DISABLE=1 PACKER_CACHE_DIR=$(CURDIR)/build/packer_cache \
	packer build -color=false -force \
	  -var-file=packer/targets/$(IMAGE_TARGET).pkrvars.hcl \
	  -var project_dir=$(CURDIR) \
	  -var output_dir=$(abspath $(IMAGE_DIR)) \
	  -var python=$(CURDIR)/$(BIN)/python \
	  -var apt_cache_dir=$(CURDIR)/$(IMAGE_APT_CACHE) \
	  packer/sbc.pkr.hcl && \
	echo "$$(( $$(date +%s) - start ))" > $(IMAGE_DIR)/build-seconds && \
	echo "- image built in $$(cat $(IMAGE_DIR)/build-seconds) s: $(IMAGE_DIR)"

image: $(IMAGE_DIR)/SHA256SUMS

# Fast checks (flash helper refusals, unit file, overlay) run first; then the image tests
# (build if stale, QEMU boot, SIP OPTIONS, health, open ports, systemd-analyze, lynis).
test-image: test-image-fast test-image-slow

test-image-fast: deps
	$(BIN)/python -m pytest -q -m "not image" tests/image

test-image-slow: deps image-deps
	SBC_IMAGE_TARGET=$(IMAGE_TARGET) SBC_IMAGE_DIR=$(abspath $(IMAGE_DIR)) \
	  $(BIN)/python -m pytest -q -m image -p no:cacheprovider --timeout=3600 tests/image

flash: image-deps
	@test -n "$(DEVICE)" || { echo "x usage: make flash DEVICE=/dev/sdX [IMAGE_TARGET=bare-metal]" >&2; exit 2; }
	$(PYTHON) packer/sbc-flash $(if $(FLASH_YES),--yes) $(IMAGE_DIR)/$(IMAGE_NAME).raw.zst $(DEVICE)
