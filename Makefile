# ./dev demo (or make demo)  - a guest on emulated dmemfs in a private libvirtd sandbox, then a refusal, then cleanup
# ./dev test (or make test)  - bootstrap, lint, then the whole test suite (end-to-end included); as root on Debian 12
# make unit / make e2e / make e2e-numa / make lint / make bootstrap - the parts
# make numa-image            - build (or find cached) the two-NUMA-node test VM image

PYTHON  ?= /usr/bin/python3
VENV    := .venv
BIN     := $(VENV)/bin
# The sandbox's libvirtd + QEMU (util-linux: unshare, nsenter), what libvirt-python compiles against,
# and what builds the two-node test VM's image (debootstrap, mkfs.ext4 -d).
APT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 libxml2-utils \
                util-linux python3-venv python3-dev libvirt-dev pkg-config gcc debootstrap e2fsprogs

.PHONY: bootstrap apt unit e2e e2e-numa numa-image lint test demo

bootstrap: apt $(VENV)/.installed

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "apt-get install" $$missing; \
	    apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

unit: $(VENV)/.installed
	$(BIN)/pytest -q -m 'not e2e'

e2e: bootstrap
	$(BIN)/pytest -q -m 'e2e and not e2e_numa'

# The image is cached outside the clone (tests/numavm/image.py): built once per machine and input set.
numa-image: bootstrap
	$(BIN)/python tests/numavm/vm.py image

e2e-numa: numa-image
	$(BIN)/pytest -q -m e2e_numa

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

test: bootstrap
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory numa-image
	$(BIN)/pytest -q

demo: bootstrap
	$(BIN)/python tests/sandbox.py demo
