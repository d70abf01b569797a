# ./dev demo (or make demo)  - a guest on emulated dmemfs in a private libvirtd sandbox, then a refusal, then cleanup
# ./dev test (or make test)  - bootstrap, lint, then the whole test suite (end-to-end included); as root on Debian 12
# make unit / make e2e / make lint / make bootstrap - the parts; make model - 10,000 randomized lifecycle steps

PYTHON  ?= /usr/bin/python3
VENV    := .venv
BIN     := $(VENV)/bin
# The sandbox's libvirtd + QEMU (util-linux: unshare, nsenter), and what libvirt-python compiles against.
APT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 libxml2-utils \
                util-linux python3-venv python3-dev libvirt-dev pkg-config gcc

.PHONY: bootstrap apt unit e2e lint test demo model

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
	$(BIN)/pytest -q -m e2e

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

test: bootstrap
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest -q

demo: bootstrap
	$(BIN)/python tests/sandbox.py demo

# The randomized lifecycle model, long (CI runs 1,000 steps of it in the unit tests).
model: $(VENV)/.installed
	$(BIN)/python bench/model.py --steps 10000
