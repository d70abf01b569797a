"""The Debian package: `make deb` builds it, lintian finds no error, `dpkg -i` installs it into a private
libvirtd sandbox, a guest runs through the *packaged* hook, and `dpkg --purge` takes everything away again.

dpkg runs inside the sandbox's mount namespace: /etc/libvirt, /etc/dmem-libvirt and /var/lib/dmem-libvirt are
the sandbox's own, while /usr and dpkg's database are the machine's, which the purge leaves as they were.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import bring_up, sandbox_root
from sandbox import REPO, Sandbox, with_domain_type

HOOK = Path("/etc/libvirt/hooks/qemu.d/50-dmem-libvirt")
PACKAGED_HOOK = Path("/usr/libexec/dmem-libvirt/50-dmem-libvirt")
STATE = Path("/var/lib/dmem-libvirt")
CONFIG = Path("/etc/dmem-libvirt/config.toml")
COMMAND = "/usr/bin/dmem-libvirt"
SERVER_UNIT = "dmem-libvirt-hook-server.service"
# What the package puts on the machine itself (outside the sandbox's private directories).
ON_THE_MACHINE = tuple(map(Path, (COMMAND, "/usr/bin/dmem-libvirt-hook", "/usr/lib/python3/dist-packages/dmem_libvirt",
                                   "/usr/libexec/dmem-libvirt", "/usr/share/man/man8/dmem-libvirt.8.gz",
                                   "/usr/share/doc/dmem-libvirt", f"/lib/systemd/system/{SERVER_UNIT}",
                                   f"/usr/lib/systemd/system/{SERVER_UNIT}",
                                   f"/etc/systemd/system/multi-user.target.wants/{SERVER_UNIT}")))
GUEST = "guest-small"


def installed_status() -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "dmem-libvirt"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else "not known"


@pytest.fixture(scope="module")
def deb() -> Path:
    """`make deb` from this tree; fails when the package is on the machine already (the test would remove it)."""
    if installed_status().startswith("i"):
        pytest.fail("dmem-libvirt is installed on this machine: the package test installs and purges it itself "
                    "(dpkg --purge dmem-libvirt first)", pytrace=False)
    started = time.monotonic()
    built = subprocess.run(["make", "--no-print-directory", "deb"], cwd=REPO, capture_output=True, text=True,
                           timeout=900, check=False)
    assert built.returncode == 0, f"make deb failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    print(f"\nmake deb: {time.monotonic() - started:.1f} s")
    [package] = (REPO / "build" / "deb").glob("dmem-libvirt_*_all.deb")
    lintian = (REPO / "build" / "deb" / "lintian.txt").read_text()
    assert [line for line in lintian.splitlines() if line.startswith("E:")] == []
    return package


@pytest.fixture
def box() -> Iterator[Sandbox]:
    """A sandbox without the venv's hook: the only hook libvirt can run is the package's."""
    sandbox = bring_up(sandbox_root("deb"), hook=False)
    try:
        yield sandbox
    finally:
        sandbox.run(["dpkg", "--purge", "dmem-libvirt"], check=False)
        sandbox.down()


def dpkg(box: Sandbox, *argv: str) -> subprocess.CompletedProcess[str]:
    return box.run(["env", "DEBIAN_FRONTEND=noninteractive", "dpkg", *argv])


def status(box: Sandbox) -> Any:
    return json.loads(box.run([COMMAND, "status", "--json"]).stdout)


def test_the_package_installs_runs_a_guest_through_its_hook_and_purges_cleanly(deb: Path, box: Sandbox) -> None:
    assert [path for path in ON_THE_MACHINE if path.exists()] == []
    sandbox_config = box.private(CONFIG).read_text()

    # The sandbox's config (emulated dmemfs) is already there: keep it, as an administrator's own would be.
    installed = dpkg(box, "-i", "--force-confold", str(deb))
    assert f"dmem-libvirt: reloaded libvirtd (pid {box.libvirtd_pid()})" in installed.stdout
    assert os.readlink(box.inside(HOOK)) == str(PACKAGED_HOOK)
    assert PACKAGED_HOOK.read_text().splitlines()[0] == "#!/bin/sh"
    assert "\nPYTHON=/usr/bin/python3\n" in PACKAGED_HOOK.read_text()
    state = box.private(STATE).stat()
    assert (stat.S_IMODE(state.st_mode), state.st_uid, state.st_gid) == (0o700, 0, 0)
    fields = box.run(["dpkg-query", "-W", "-f=${Depends}\n${Conffiles}\n", "dmem-libvirt"]).stdout
    assert "python3-libvirt" in fields and "python3-lxml" in fields and str(CONFIG) in fields
    assert box.run(["man", "-w", "dmem-libvirt"]).stdout.strip() == "/usr/share/man/man8/dmem-libvirt.8.gz"
    files = box.run(["dpkg", "-L", "dmem-libvirt"]).stdout.splitlines()
    assert [path for path in files if path.endswith(f"/systemd/system/{SERVER_UNIT}")]

    # A guest through the packaged command and hook.
    box.define(with_domain_type((REPO / "examples" / f"{GUEST}.xml").read_text(), box.domain_type))
    box.run([COMMAND, "enable", GUEST, "--nodes", "0"])
    box.virsh("start", GUEST)
    [domain] = status(box)["domains"]
    assert (domain["name"], domain["state"], domain["pid"]) == (GUEST, "pinned", box.qemu_pid(GUEST))

    # Purge with the guest running: the hook goes, the state stays for the guest, and says so.
    purged = dpkg(box, "--purge", "dmem-libvirt")
    assert (f"dmem-libvirt: {STATE} kept: running guests hold reserved memory ({GUEST}); "
            "remove it once they have stopped") in purged.stderr
    assert not box.inside(HOOK).exists() and not box.inside(HOOK).is_symlink()
    assert box.private(STATE / "ledger.json").exists()
    assert [path for path in ON_THE_MACHINE if path.exists()] == []
    box.virsh("destroy", GUEST)

    # Again, this time stopping the guest first: the purge takes the state too.
    box.private(CONFIG).write_text(sandbox_config)
    dpkg(box, "-i", "--force-confold", str(deb))
    box.virsh("start", GUEST)
    assert [d["name"] for d in status(box)["domains"]] == [GUEST]
    box.virsh("destroy", GUEST)
    assert status(box)["domains"] == []
    purged = dpkg(box, "--purge", "dmem-libvirt")
    assert "kept" not in purged.stderr
    # In the sandbox the state directory is a bind mount, which stays (empty); elsewhere it is removed.
    assert not box.private(STATE).exists() or list(box.private(STATE).iterdir()) == []
    assert not box.inside(HOOK).is_symlink()
    assert [path for path in ON_THE_MACHINE if path.exists()] == []
    assert not installed_status().startswith("i")
