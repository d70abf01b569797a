# ./dev demo (or make demo)  - a guest on emulated dmemfs in a private libvirtd sandbox, then a refusal, then cleanup
# ./dev test (or make test)  - bootstrap, lint, then the whole test suite (end-to-end included); as root on Debian 12
# make unit / make e2e / make e2e-numa / make lint / make bootstrap - the parts
# make model                - 10,000 randomized lifecycle steps
# make deb                  - build/deb/dmem-libvirt_<version>_all.deb with the Debian tooling, checked by lintian
# make numa-image           - build (or find cached) the two-NUMA-node test VM image

PYTHON  ?= /usr/bin/python3
VENV    := .venv
BIN     := $(VENV)/bin
# The sandbox's libvirtd + QEMU (util-linux: unshare, nsenter), what libvirt-python compiles against,
# and what builds the two-node test VM's image (debootstrap, mkfs.ext4 -d).
# python3-pip: the tests install the wheel into Debian's python; groff-base: they format the man page.
APT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 libxml2-utils \
                util-linux python3-venv python3-dev libvirt-dev pkg-config gcc python3-pip groff-base \
                debootstrap e2fsprogs

# What `make deb` builds with, and what the package depends on (its test installs it).
DEB_APT_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian \
                    python3-libvirt python3-lxml
DEB_DIR := build/deb

.PHONY: bootstrap apt unit e2e e2e-numa numa-image lint test demo deb model

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

# The randomized lifecycle model, long (CI runs 1,000 steps of it in the unit tests).
model: $(VENV)/.installed
	$(BIN)/python bench/model.py --steps 10000

# Built from a copy of the tree (tracked and new files, not .venv or build/), with the system's python3.
deb:
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(DEB_APT_PACKAGES)"
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C $(DEB_DIR)/src
	cd $(DEB_DIR)/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc
	lintian --fail-on error --display-info $(DEB_DIR)/dmem-libvirt_*_all.deb | tee $(DEB_DIR)/lintian.txt
