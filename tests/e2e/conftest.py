"""End-to-end fixtures: one private libvirtd + QEMU sandbox (tests/sandbox.py) for the whole session.

Every test under tests/e2e is marked `e2e`.  The `sandbox` fixture comes up once with the dmem-libvirt hook
installed and fails (never skips) with what to install when it cannot; `peer` is a second such host, for
migrations, brought up on first use; `hookless` removes the hook for one test.  `guest` builds a small
diskless guest XML with the sandbox's <domain type> (KVM or TCG); `enabled` defines one and runs
`dmem-libvirt enable` on it; `running` defines and starts one.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dmem_libvirt.units import GiB, MiB

from sandbox import APT_PACKAGES, Sandbox, SandboxError, guest_xml

E2E_DIR = Path(__file__).resolve().parent
PER_NODE = 2 * GiB
# The second host's pool: smaller than the first's, and partly taken by memory the ledger does not know.
PEER_PER_NODE = GiB
PEER_USED = 256 * MiB
INSTALL_HINT = (f"run `make bootstrap` as root, or: apt-get install {' '.join(APT_PACKAGES)} "
                "&& .venv/bin/pip install -e '.[test]'")

GuestFactory = Callable[..., str]


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # `timeout` and CI runners stop a run with SIGTERM, which would skip every teardown and leave the
    # sandboxes' libvirtd and QEMU running: taken as Ctrl-C, the fixtures still take them down.
    signal.signal(signal.SIGTERM, _interrupted)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


def sandbox_root(tag: str) -> Path:
    """A short root under /run: the daemon's socket path, below it, must stay under 108 bytes."""
    return Path(f"/run/dmem-sandbox-{tag}-{os.getpid()}")


def bring_up(root: Path, *, hook: bool = True, per_node: int = PER_NODE, used: int = 0) -> Sandbox:
    """Sandbox(root).up(), or fail the test with the reason and what to install."""
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests need root: they run a private libvirtd and QEMU "
                    "(run `make e2e` as root)", pytrace=False)
    box = Sandbox(root, per_node, hook=hook, used=used)
    try:
        return box.up()
    except (SandboxError, OSError) as err:
        pytest.fail(f"the sandbox did not come up: {err}\n{INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    box = bring_up(sandbox_root("e2e"))
    yield box
    box.down()


@pytest.fixture(scope="session")
def peer(sandbox: Sandbox) -> Iterator[Sandbox]:
    """A second host beside `sandbox`: its own host name, host UUID, libvirtd, ledger and a smaller pool."""
    box = bring_up(sandbox_root("peer"), per_node=PEER_PER_NODE, used=PEER_USED)
    yield box
    box.down()


@pytest.fixture
def hookless(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The session sandbox without the dmem-libvirt hook for one test (put back afterwards)."""
    sandbox.remove_hook()
    yield sandbox
    sandbox.install_hook()


@pytest.fixture
def guest(sandbox: Sandbox) -> GuestFactory:
    """guest(name, memory=256 MiB, cells=(), file_backed=False, ...) -> domain XML for this sandbox."""

    def build(name: str, memory: int = 256 * MiB, *, cells: Sequence[int] = (), file_backed: bool = False,
              console: bool = False) -> str:
        return guest_xml(name, memory, domain_type=sandbox.domain_type, cells=cells,
                         file_backed=file_backed, console=console)

    return build


@pytest.fixture
def enabled(sandbox: Sandbox, guest: GuestFactory) -> Iterator[Callable[..., str]]:
    """enabled(name, memory=256 MiB, cells=()): define a guest, `dmem-libvirt enable` it, return its name.

    The guest is not started; it is destroyed (which releases its reservation) and undefined after the test.
    """
    names: list[str] = []

    def enable(name: str, memory: int = 256 * MiB, *, cells: Sequence[int] = ()) -> str:
        sandbox.define(guest(name, memory, cells=cells))
        names.append(name)
        sandbox.dmem("enable", name)
        return name

    yield enable
    for name in names:
        sandbox.virsh("destroy", name, check=False)
        sandbox.virsh("undefine", name, check=False)


@pytest.fixture
def running(sandbox: Sandbox) -> Iterator[Callable[[str, str], int]]:
    """running(name, xml): define and start a guest, return its QEMU pid; undefined after the test."""
    names: list[str] = []

    def start(name: str, xml: str) -> int:
        sandbox.define(xml)
        names.append(name)
        sandbox.virsh("start", name)
        return sandbox.qemu_pid(name)

    yield start
    for name in names:
        sandbox.virsh("destroy", name, check=False)
        sandbox.virsh("undefine", name, check=False)
