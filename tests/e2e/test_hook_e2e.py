"""The hook under a real libvirtd: `virsh start` of guests enabled with `dmem-libvirt enable` admits, pins,
verifies and releases their RAM on the sandbox's emulated dmemfs; refusals reach the user through virsh."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dmem_libvirt.backends.emulated import DIRTY_PATTERN
from dmem_libvirt.install import HOOK_NAME
from dmem_libvirt.units import MiB, format_size

from .conftest import GuestFactory
from sandbox import HOOK_FAILED, Sandbox, SandboxError, memory_arguments

Enable = Callable[..., str]
Start = Callable[[str, str], int]

# What libvirt prints before the hook's stderr when a hook fails (measured on 9.0).
SIZE = r"\d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)"
STATE_DIR = "/var/lib/dmem-libvirt"
STOP_WAIT = 15.0


# ---- what the user and the host can see ---------------------------------------------------------------

def status(box: Sandbox) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(box.dmem("status", "--json").stdout)
    return data


def reservations_of(box: Sandbox, name: str) -> list[dict[str, Any]]:
    return [r for r in status(box)["reservations"] if r["domain"] == name]


def pinned_files(box: Sandbox, name: str) -> dict[str, tuple[int, int]]:
    """path -> (inode, bytes) of the files the hook pinned for ``name``, as its durable ledger records them."""
    ledger = json.loads((box.private(STATE_DIR) / "ledger.json").read_text())
    return {r["path"]: (r["inode"], r["bytes"]) for r in ledger["reservations"] if r["domain"] == name}


def memory_backends(box: Sandbox, name: str) -> list[dict[str, Any]]:
    return [json.loads(arg) for arg in memory_arguments(box.qemu_cmdline(name))]


def mapped_bytes(pid: int, path: str, inode: int) -> int:
    """Bytes of ``path`` (that very inode) mapped into process ``pid``, from /proc/<pid>/maps."""
    total = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == path and int(fields[4]) == inode:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            total += end - start
    return total


def hook_line(stderr: str) -> str:
    """The line the hook printed, out of virsh's `error: Hook script execution failed: ...`."""
    found = HOOK_FAILED.findall(stderr)
    assert len(found) == 1, f"virsh did not show one hook refusal:\n{stderr}"
    return str(found[0]).strip()


def files_on_mount(box: Sandbox) -> list[str]:
    mount = box.inside(box.dmem_mount)
    return sorted(str(p.relative_to(mount)) for p in mount.rglob("*") if not p.is_dir())


def counters(box: Sandbox) -> dict[str, int]:
    """The emulated dmemfs debugfs counters of every node: free and total pages."""
    out = {}
    for scope in ["", *(f"node{node}/" for node in box.nodes())]:
        for name in ("free_dpages", "total_dpages"):
            out[scope + name] = int((box.debugfs / (scope + name)).read_text())
    return out


def assert_all_memory_returned(box: Sandbox) -> None:
    assert status(box)["reservations"] == []
    assert files_on_mount(box) == []
    pages = counters(box)
    for scope in ["", *(f"node{node}/" for node in box.nodes())]:
        assert pages[scope + "free_dpages"] == pages[scope + "total_dpages"], pages


def wait_until(condition: Callable[[], bool], what: str, timeout: float = STOP_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:.0f} s", pytrace=False)
        time.sleep(0.05)


def domstate(box: Sandbox, name: str) -> str:
    return box.virsh("domstate", name).stdout.strip()


def assert_pinned_and_mapped(box: Sandbox, name: str, memory: int) -> int:
    """The guest's reservation is pinned by its running QEMU, which maps exactly the pinned inodes."""
    pid = box.qemu_pid(name)
    mine = reservations_of(box, name)
    assert [(r["state"], r["pid"]) for r in mine] == [("pinned", pid)] * len(mine)
    assert sum(r["bytes"] for r in mine) == memory
    files = pinned_files(box, name)
    assert sum(size for _, size in files.values()) == memory
    # QEMU maps each backing file once, whole (its guard page is anonymous memory).
    assert {path: mapped_bytes(pid, path, inode) for path, (inode, _) in files.items()} == \
        {path: size for path, (_, size) in files.items()}
    return pid


@pytest.fixture(autouse=True)
def empty_pool(sandbox: Sandbox) -> None:
    """Every test starts from an empty pool, so one that leaked memory fails where it leaked."""
    assert_all_memory_returned(sandbox)


# ---- 1. start through the hook ------------------------------------------------------------------------

def test_enabled_guest_runs_on_a_pinned_file_bound_to_node_0_that_qemu_maps(
        sandbox: Sandbox, enabled: Enable) -> None:
    name = enabled("pinned")
    sandbox.virsh("start", name)
    [backend] = memory_backends(sandbox, name)
    assert backend["qom-type"] == "memory-backend-file"
    assert sandbox.dmem_mount in Path(backend["mem-path"]).parents
    assert (backend["share"], backend["host-nodes"], backend["policy"], backend["size"]) == \
        (True, [0], "bind", 256 * MiB)
    pid = assert_pinned_and_mapped(sandbox, name, 256 * MiB)
    assert list(pinned_files(sandbox, name)) == [backend["mem-path"]]
    assert [(d["name"], d["state"], d["pid"]) for d in status(sandbox)["domains"]] == [(name, "pinned", pid)]


def test_guest_with_two_cells_gets_one_pinned_file_per_cell(sandbox: Sandbox, enabled: Enable) -> None:
    name = enabled("two-cells", cells=(128 * MiB, 128 * MiB))
    sandbox.virsh("start", name)
    paths = sorted(Path(b["mem-path"]).name for b in memory_backends(sandbox, name))
    assert paths == ["ram-node0", "ram-node1"]
    assert_pinned_and_mapped(sandbox, name, 256 * MiB)


def test_running_guest_ram_holds_none_of_the_previous_tenants_pattern(
        sandbox: Sandbox, enabled: Enable) -> None:
    name = enabled("scrubbed")
    sandbox.virsh("start", name)
    [path] = pinned_files(sandbox, name)
    seen = 0
    tail = b""
    with sandbox.inside(path).open("rb") as ram:
        while chunk := ram.read(16 * MiB):
            assert DIRTY_PATTERN not in tail + chunk, f"{path} holds the emulated previous tenant's data"
            tail = chunk[-len(DIRTY_PATTERN):]
            seen += len(chunk)
    assert seen == 256 * MiB


# ---- 2. and 5. refusals ----------------------------------------------------------------------------

def test_guest_that_no_longer_fits_is_refused_by_virsh_start_with_the_hooks_line(
        sandbox: Sandbox, enabled: Enable) -> None:
    # Both fit the empty 2 GiB pool when enabled; once the first runs, the second does not.
    taker = enabled("taker")
    late = enabled("late", 1920 * MiB)
    sandbox.virsh("start", taker)
    before = status(sandbox)["reservations"]
    refused = sandbox.virsh("start", late, check=False)
    assert refused.returncode == 1
    line = hook_line(refused.stderr)
    assert line.startswith(f"dmem-libvirt: {late}: ")
    needs = re.escape(f"{format_size(1920 * MiB)} of 2 MiB dmem pages on host node 0; ")
    assert re.search(rf"{needs}{SIZE} free", line), line
    assert status(sandbox)["reservations"] == before
    assert domstate(sandbox, late) == "shut off"


def test_two_concurrent_starts_that_fit_only_one_at_a_time_start_exactly_one(
        sandbox: Sandbox, enabled: Enable) -> None:
    size = 1152 * MiB
    names = [enabled("race-a", size), enabled("race-b", size)]
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(names, pool.map(lambda n: sandbox.virsh("start", n, check=False), names), strict=True))
    started = [name for name, result in results.items() if result.returncode == 0]
    assert len(started) == 1, {name: result.stderr for name, result in results.items()}
    [winner] = started
    [loser] = [name for name in names if name != winner]
    assert hook_line(results[loser].stderr).startswith(
        f"dmem-libvirt: {loser}: guest needs {format_size(size)} of 2 MiB dmem pages on host node 0; ")
    assert domstate(sandbox, loser) == "shut off"
    assert reservations_of(sandbox, loser) == []
    assert_pinned_and_mapped(sandbox, winner, size)
    [pool] = status(sandbox)["pools"]
    assert (pool["pinned"], pool["reserved"], pool["free"]) == (size, 0, pool["total"] - size)


# ---- 3. every way of stopping gives everything back ------------------------------------------------------

def _destroy(box: Sandbox, name: str) -> None:
    box.virsh("destroy", name)


def _shutdown_then_destroy(box: Sandbox, name: str) -> None:
    box.virsh("shutdown", name)
    # No operating system answers the ACPI request; an administrator destroys the guest after a timeout.
    time.sleep(1.0)
    assert domstate(box, name) == "running"
    box.virsh("destroy", name)


def _kill_qemu(box: Sandbox, name: str) -> None:
    os.kill(box.qemu_pid(name), signal.SIGKILL)
    wait_until(lambda: domstate(box, name) == "shut off", f"libvirt noticing that {name}'s QEMU died")


@pytest.mark.parametrize("stop", [_destroy, _shutdown_then_destroy, _kill_qemu],
                         ids=["destroy", "shutdown-never-booted", "kill-9"])
def test_stopping_a_guest_leaves_no_file_no_reservation_and_full_free_counters(
        sandbox: Sandbox, enabled: Enable, stop: Callable[[Sandbox, str], None]) -> None:
    name = enabled("stopped")
    sandbox.virsh("start", name)
    assert files_on_mount(sandbox) and status(sandbox)["reservations"]
    stop(sandbox, name)
    # libvirt runs the stop hooks from its event loop after a crash: wait for the release, then check all.
    wait_until(lambda: not status(sandbox)["reservations"], f"{name}'s reservation being released")
    assert_all_memory_returned(sandbox)


# ---- 4. libvirtd restart -----------------------------------------------------------------------------------

def test_restarting_libvirtd_keeps_the_guest_running_and_pinned(sandbox: Sandbox, enabled: Enable) -> None:
    name = enabled("survivor")
    sandbox.virsh("start", name)
    pid = sandbox.qemu_pid(name)
    daemon = sandbox.libvirtd_pid()
    sandbox.restart_libvirtd()
    assert sandbox.libvirtd_pid() not in (None, daemon)
    assert domstate(sandbox, name) == "running"
    assert sandbox.qemu_pid(name) == pid
    assert assert_pinned_and_mapped(sandbox, name, 256 * MiB) == pid


def test_restarting_libvirtd_rebuilds_a_lost_ledger_from_the_running_guest(
        sandbox: Sandbox, enabled: Enable) -> None:
    name = enabled("amnesia")
    sandbox.virsh("start", name)
    pid = sandbox.qemu_pid(name)
    (sandbox.private(STATE_DIR) / "ledger.json").unlink()
    sandbox.restart_libvirtd()
    assert domstate(sandbox, name) == "running"
    assert assert_pinned_and_mapped(sandbox, name, 256 * MiB) == pid
    # The first transaction after the loss rebuilds the running guests, before reconnect looks.
    assert [r["origin"] for r in reservations_of(sandbox, name)] == ["rebuilt"]


# ---- 6. save and restore ---------------------------------------------------------------------------------

def test_saved_guest_gives_its_memory_back_and_is_restored_pinned(sandbox: Sandbox, enabled: Enable) -> None:
    name = enabled("saved")
    sandbox.virsh("start", name)
    first = sandbox.qemu_pid(name)
    image = f"/var/lib/libvirt/{name}.save"
    try:
        sandbox.virsh("save", name, image)
        assert domstate(sandbox, name) == "shut off"
        assert_all_memory_returned(sandbox)
        sandbox.virsh("restore", image)
    finally:
        sandbox.private(image).unlink(missing_ok=True)
    assert domstate(sandbox, name) == "running"
    pid = assert_pinned_and_mapped(sandbox, name, 256 * MiB)
    assert pid != first
    assert [r["origin"] for r in reservations_of(sandbox, name)] == ["prepare"]


# ---- 7. guests that are not ours -------------------------------------------------------------------------

def test_guest_without_metadata_runs_on_anonymous_ram_as_without_the_hook(
        sandbox: Sandbox, guest: GuestFactory, running: Start) -> None:
    pid = running("anonymous", guest("anonymous"))
    assert [b["qom-type"] for b in memory_backends(sandbox, "anonymous")] == ["memory-backend-ram"]
    assert status(sandbox)["reservations"] == []
    sandbox.virsh("destroy", "anonymous")
    assert domstate(sandbox, "anonymous") == "shut off"
    assert not Path(f"/proc/{pid}").exists()


def test_file_backed_guest_without_metadata_is_refused_because_the_backing_dir_is_dmemfs(
        sandbox: Sandbox, guest: GuestFactory, running: Start) -> None:
    with pytest.raises(SandboxError) as refused:
        running("stray", guest("stray", file_backed=True))
    assert hook_line(refused.value.message) == (
        "dmem-libvirt: stray: memory_backing_dir is on dmemfs; run 'dmem-libvirt enable stray' or use memfd")
    assert domstate(sandbox, "stray") == "shut off"


# ---- 9. installing the hook into a running daemon -------------------------------------------------------

def test_install_hook_on_a_running_daemon_takes_effect_at_the_next_start(
        hookless: Sandbox, enabled: Enable) -> None:
    name = enabled("late-hook")
    daemon = hookless.libvirtd_pid()
    hookless.install_hook()
    hookless.virsh("start", name)
    assert hookless.libvirtd_pid() == daemon
    assert_pinned_and_mapped(hookless, name, 256 * MiB)


# ---- 10. the hook server ------------------------------------------------------------------------------------

def test_with_the_hook_server_a_guest_starts_pinned_and_scrubbed_and_gives_everything_back(
        sandbox: Sandbox, enabled: Enable) -> None:
    name = enabled("served")
    hook = sandbox.private("/etc/libvirt") / "hooks" / "qemu.d" / HOOK_NAME
    installed = hook.read_text()
    paths = re.search(r"^LIBRARY_PATHS: list\[str\] = .*$", installed, re.M)
    assert paths is not None
    server = sandbox.start_hook_server()
    try:
        # The script can no longer import the package itself: what runs our guest's calls is the server.
        hook.write_text(installed.replace(paths.group(0), "LIBRARY_PATHS: list[str] = ['/nonexistent']"))
        sandbox.virsh("start", name)
        assert_pinned_and_mapped(sandbox, name, 256 * MiB)
        [path] = pinned_files(sandbox, name)
        with sandbox.inside(path).open("rb") as ram:
            while chunk := ram.read(16 * MiB):
                assert DIRTY_PATTERN not in chunk, f"{path} holds the emulated previous tenant's data"
        _destroy(sandbox, name)
        wait_until(lambda: not status(sandbox)["reservations"], f"{name}'s reservation being released")
        assert_all_memory_returned(sandbox)
        assert server.poll() is None
    finally:
        hook.write_text(installed)
        server.terminate()
        server.wait(timeout=30)
    # Without the server the script's own import is back, and so is every guest's start.
    sandbox.virsh("start", name)
    assert_pinned_and_mapped(sandbox, name, 256 * MiB)
    _destroy(sandbox, name)
    wait_until(lambda: not status(sandbox)["reservations"], f"{name}'s reservation being released")
