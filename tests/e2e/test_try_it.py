"""README "Try it on your own libvirt", followed to the letter in the sandbox: its configuration and its
commands, with nothing but the emulated backend's counters beside the ledger (no debugfs-shaped directory).

Only the host preparation differs: the sandbox already has its tmpfs and points libvirt's memory_backing_dir
at it, so the README's configuration gets that mount added.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import REPO, Sandbox, with_domain_type

CONFIG = Path("/etc/dmem-libvirt/config.toml")
COUNTERS = Path("/var/lib/dmem-libvirt/emulated-dmem")


def section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Try it on your own libvirt")
    return text[start:text.index("\n## ", start + 1)]


def readme_config() -> str:
    [block] = re.findall(r"```toml\n(.*?)```", section(), re.S)
    return "\n".join(line.strip() for line in block.splitlines()) + "\n"


def readme_commands() -> list[list[str]]:
    """The `dmem-libvirt` and `virsh` lines of the section's last shell block, in order."""
    block = re.findall(r"```sh\n(.*?)```", section(), re.S)[-1]
    return [shlex.split(line) for line in map(str.strip, block.splitlines())
            if line.startswith(("dmem-libvirt ", "virsh "))]


@pytest.fixture
def readme_host(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The sandbox with the README's configuration (its own mount added); put back afterwards."""
    config = sandbox.private(CONFIG)
    original = config.read_text()
    readme = readme_config()
    assert "debugfs" not in readme
    config.write_text(readme.replace("[dmemfs]\n", f'[dmemfs]\nmount = "{sandbox.dmem_mount}"\n', 1))
    try:
        yield sandbox
    finally:
        sandbox.virsh("destroy", "guest-small", check=False)
        sandbox.virsh("undefine", "guest-small", check=False)
        config.write_text(original)


def test_the_readme_walkthrough_runs_a_guest_on_counters_beside_the_ledger(readme_host: Sandbox) -> None:
    box = readme_host
    outputs: list[tuple[list[str], subprocess.CompletedProcess[str]]] = []
    for argv in readme_commands():
        if argv[:2] == ["virsh", "define"]:
            # The example guest, with the <domain type> this sandbox can run (TCG without /dev/kvm access).
            box.define(with_domain_type((REPO / argv[2]).read_text(), box.domain_type))
            continue
        result = box.dmem(*argv[1:]) if argv[0] == "dmem-libvirt" else box.virsh(*argv[1:])
        outputs.append((argv, result))
    commands = [" ".join(argv) for argv, _ in outputs]
    assert commands == ["dmem-libvirt install-hook", "dmem-libvirt check", "dmem-libvirt enable guest-small --nodes 0",
                        "virsh start guest-small", "dmem-libvirt status", "virsh destroy guest-small",
                        "dmem-libvirt status"]
    check = outputs[1][1].stdout
    assert f"ok    dmem statistics in {COUNTERS} readable" in check
    running, stopped = outputs[4][1].stdout, outputs[6][1].stdout
    assert "   0      1.0 GiB    768.0 MiB          0 B    256.0 MiB" in running
    assert re.search(r"^guest-small +0 +256\.0 MiB  pinned", running, re.M)
    assert "   0      1.0 GiB      1.0 GiB          0 B          0 B" in stopped
    assert "no domain holds reserved memory" in stopped
    assert box.private(COUNTERS / "node0" / "total_dpages").read_text() == "512\n"
