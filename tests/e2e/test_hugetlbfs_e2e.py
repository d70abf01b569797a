"""The hugetlbfs backend under a real libvirtd, on this machine's real kernel pools.

The pools and ``vm.hugetlb_optimize_vmemmap`` are host-global: `HostPools` (tests/hostpools.py) records
every pool's ``nr_hugepages`` (per node and global) and ``nr_overcommit_hugepages`` and the HVO setting
before each test and writes them back afterwards, also when the test fails; a module-wide fixture does it
once more at the end.  Each test switches the sandbox's dmem-libvirt config to the hugetlbfs backend and back.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hostpools
import pytest
from hostpools import HVO, PAGE, HostPools, pool

from dmem_libvirt.units import GiB, KiB, MiB, format_size

from .test_hook_e2e import hook_line
from sandbox import Sandbox, SandboxError, guest_xml

STOP_WAIT = 15.0
PATTERN = b"PREVIOUS-TENANT!"


def set_pool(pages: int, node: int = 0, size: int = PAGE) -> None:
    assert hostpools.set_pool(pages, node, size) == pages, f"the kernel did not give {pages} pages on node {node}"


def memmap_bytes() -> int:
    """The kernel's struct page memory, after folding the per-CPU counters."""
    Path("/proc/sys/vm/stat_refresh").write_text("1\n")
    values = dict(line.split() for line in Path("/proc/vmstat").read_text().splitlines())
    return (int(values["nr_memmap_pages"]) + int(values["nr_memmap_boot_pages"])) * 4096


def guest_ram(pid: int) -> tuple[int, int, list[str]]:
    """(start, end) of QEMU's guest RAM mapping on hugetlbfs and its numa_maps fields."""
    for line in Path(f"/proc/{pid}/numa_maps").read_text().splitlines():
        if "qemu_back_mem." in line:
            start = int(line.split()[0], 16)
            for row in Path(f"/proc/{pid}/maps").read_text().splitlines():
                low, high = (int(x, 16) for x in row.split()[0].split("-"))
                if low == start:
                    return low, high, line.split()
    raise AssertionError(f"QEMU (pid {pid}) maps no hugetlbfs guest RAM")


class Huge:
    """The sandbox running the hugetlbfs backend, and the guests a test made."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.names: list[str] = []
        self.base = pool()[0]

    def config(self, limit: dict[int, int] | None = None) -> None:
        self.box.use_config(self.box.hugetlbfs_config(limit))

    def define(self, name: str, memory: int, *, cells: bool = True, hugepages: int | None = None) -> str:
        self.box.define(guest_xml(name, memory, domain_type=self.box.domain_type,
                                  cells=(memory,) if cells else (), hugepages=hugepages))
        self.names.append(name)
        return name

    def enabled(self, name: str, memory: int, **kwargs: Any) -> str:
        self.define(name, memory, **kwargs)
        self.box.dmem("enable", name, "--nodes", "0")
        return name

    def start(self, name: str) -> Any:
        return self.box.virsh("start", name, check=False)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.box.dmem("status", "--json").stdout)
        return data

    def wait_shut_off(self, name: str) -> None:
        deadline = time.monotonic() + STOP_WAIT
        while self.box.virsh("domstate", name, check=False).stdout.strip() != "shut off":
            assert time.monotonic() < deadline, f"{name} did not stop within {STOP_WAIT} s"
            time.sleep(0.1)

    def cleanup(self) -> None:
        for name in self.names:
            self.box.virsh("destroy", name, check=False)
            self.box.virsh("undefine", name, check=False)
        self.box.use_config(self.box.emulated_config())


@pytest.fixture(scope="module", autouse=True)
def host_pools() -> Iterator[HostPools]:
    """The machine's pools are ours alone for the module, and end as they were found whatever happens."""
    with hostpools.exclusive():
        before = HostPools.take()
        try:
            yield before
        finally:
            before.restore()


@pytest.fixture
def huge(sandbox: Sandbox) -> Iterator[Huge]:
    before = HostPools.take()
    made = Huge(sandbox)
    try:
        yield made
    finally:
        try:
            made.cleanup()
        finally:
            before.restore()


def test_start_grows_node_0_by_exactly_the_guests_pages_qemu_binds_them_and_destroy_gives_them_back(
        huge: Huge) -> None:
    huge.config({0: huge.base * PAGE + GiB})
    name = huge.enabled("h-grow", 128 * MiB)
    result = huge.start(name)
    assert result.returncode == 0, result.stderr
    assert pool()[0] == huge.base + 64
    _, _, fields = guest_ram(huge.box.qemu_pid(name))
    assert fields[1] == "bind:0" and "huge" in fields
    assert "N0=64" in fields and "kernelpagesize_kB=2048" in fields
    assert huge.status()["reservations"][0]["state"] == "pinned"
    huge.box.virsh("destroy", name)
    assert pool()[0] == huge.base
    assert huge.status()["reservations"] == []


def test_a_killed_qemu_gives_exactly_its_pages_back(huge: Huge) -> None:
    huge.config({0: huge.base * PAGE + GiB})
    name = huge.enabled("h-kill", 64 * MiB)
    assert huge.start(name).returncode == 0
    assert pool()[0] == huge.base + 32
    os.kill(huge.box.qemu_pid(name), signal.SIGKILL)
    huge.wait_shut_off(name)
    deadline = time.monotonic() + STOP_WAIT
    while pool()[0] != huge.base and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool()[0] == huge.base


def test_an_operators_presized_pool_is_used_first_and_never_shrunk(huge: Huge) -> None:
    set_pool(huge.base + 32)
    huge.config({0: (huge.base + 32) * PAGE + GiB})
    name = huge.enabled("h-presized", 64 * MiB)
    assert huge.start(name).returncode == 0
    assert pool()[0] == huge.base + 32
    huge.box.virsh("destroy", name)
    assert pool()[0] == huge.base + 32


def test_a_guest_beyond_the_limit_is_refused_before_qemu_runs_and_no_pool_changes(huge: Huge) -> None:
    # Enabled while the limit allowed it; the operator lowered the limit since.
    huge.config({0: huge.base * PAGE + GiB})
    name = huge.enabled("h-big", 256 * MiB)
    huge.config({0: huge.base * PAGE + 64 * MiB})
    before = HostPools.take()
    result = huge.start(name)
    assert result.returncode == 1
    assert hook_line(result.stderr) == (
        f"dmem-libvirt: h-big: guest cell 0 needs 256.0 MiB of 2 MiB huge pages on host node 0; "
        f"{format_size(pool()[1] * PAGE + 64 * MiB)} free; of that 64.0 MiB by growing the pool "
        f"({huge.base} pages of 2 MiB) to its limit {format_size(huge.base * PAGE + 64 * MiB)}")
    assert HostPools.take() == before
    log = huge.box.private(f"/var/log/libvirt/qemu/{name}.log")
    assert "qemu-system" not in (log.read_text() if log.exists() else ""), log.read_text()


def test_two_concurrent_starts_that_fit_only_one_at_a_time_start_exactly_one(huge: Huge) -> None:
    huge.config({0: huge.base * PAGE + 192 * MiB})
    names = [huge.enabled(f"h-race{i}", 128 * MiB) for i in range(2)]
    with ThreadPoolExecutor(2) as pool_:
        results = list(pool_.map(huge.start, names))
    assert sorted(r.returncode for r in results) == [0, 1], [r.stderr for r in results]
    refused = next(r for r in results if r.returncode)
    assert "needs 128.0 MiB of 2 MiB huge pages on host node 0" in hook_line(refused.stderr)
    assert pool()[0] == huge.base + 64


def test_a_hugepages_guest_without_metadata_starts_as_before_and_its_pages_are_counted(huge: Huge) -> None:
    set_pool(huge.base + 64)
    huge.config()
    big = huge.enabled("h-counted", 128 * MiB)
    fits = huge.enabled("h-fits", 64 * MiB)
    plain = huge.define("h-plain", 64 * MiB, cells=False, hugepages=PAGE)
    assert huge.start(plain).returncode == 0
    assert pool()[1] <= 32
    result = huge.start(big)
    assert result.returncode == 1
    assert "needs 128.0 MiB of 2 MiB huge pages on host node 0" in hook_line(result.stderr)
    assert huge.start(fits).returncode == 0
    assert pool()[0] == huge.base + 64


def test_a_1g_page_guest_starts_on_a_1g_page_or_is_refused_with_the_kernels_answer(huge: Huge) -> None:
    before = pool(0, GiB)[0]
    huge.config({0: (before + 1) * GiB})
    name = huge.define("h-1g", GiB, hugepages=GiB)
    huge.box.dmem("enable", name, "--nodes", "0")
    result = huge.start(name)
    if result.returncode == 0:
        _, _, fields = guest_ram(huge.box.qemu_pid(name))
        assert fields[1] == "bind:0" and "kernelpagesize_kB=1048576" in fields and "N0=1" in fields
        huge.box.virsh("destroy", name)
    else:
        assert hook_line(result.stderr).startswith(
            "dmem-libvirt: h-1g: needs 1.0 GiB of 1 GiB huge pages on host node 0; 0 B free; the kernel grew "
            "the pool by only 0 of the 1 pages asked")
    assert pool(0, GiB)[0] == before


def test_the_previous_tenants_pattern_never_reaches_the_next_guest(huge: Huge) -> None:
    # Exactly the guest's pages in the pool: the next guest gets the very same physical pages.
    set_pool(huge.base + 32)
    huge.config()
    first = huge.enabled("h-tenant1", 64 * MiB)
    assert huge.start(first).returncode == 0
    pid = huge.box.qemu_pid(first)
    low, high, _ = guest_ram(pid)
    # The middle of guest RAM: SeaBIOS uses the first MiB and the top.
    start, length = low + 16 * MiB, 32 * MiB
    with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(start)
        mem.write(PATTERN * (length // len(PATTERN)))
        mem.seek(start)
        assert mem.read(len(PATTERN) * 4) == PATTERN * 4
    huge.box.virsh("destroy", first)
    second = huge.enabled("h-tenant2", 64 * MiB)
    assert huge.start(second).returncode == 0
    pid = huge.box.qemu_pid(second)
    low, high, _ = guest_ram(pid)
    assert pool()[1] == huge.base and high - low == 64 * MiB
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        mem.seek(low)
        data = mem.read(high - low)
    assert PATTERN not in data


def test_a_libvirtd_restart_keeps_the_reservation_and_the_pages(huge: Huge) -> None:
    huge.config({0: huge.base * PAGE + GiB})
    name = huge.enabled("h-restart", 64 * MiB)
    assert huge.start(name).returncode == 0
    pid = huge.box.qemu_pid(name)
    huge.box.restart_libvirtd()
    assert huge.box.virsh("domstate", name).stdout.strip() == "running"
    held = [(r["domain"], r["state"], r["bytes"], r["pid"]) for r in huge.status()["reservations"]]
    assert held == [(name, "pinned", 64 * MiB, pid)]
    assert pool()[0] == huge.base + 32
    huge.box.virsh("destroy", name)
    assert pool()[0] == huge.base


def test_with_hvo_on_the_saving_status_reports_moves_with_the_kernels_counter(huge: Huge) -> None:
    if not HVO.exists():
        raise SandboxError(f"{HVO} is missing: this kernel has no HVO (CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP)")
    HVO.write_text("1\n")
    huge.config({0: huge.base * PAGE + GiB})
    name = huge.enabled("h-hvo", 128 * MiB)
    saved_before, memmap_before = huge.status()["struct_page_saved"], memmap_bytes()
    assert huge.start(name).returncode == 0
    after = huge.status()
    assert after["struct_page_saved_measured"] is True
    assert memmap_before - memmap_bytes() == 64 * 28 * KiB
    assert after["struct_page_saved"] - saved_before == 64 * 28 * KiB
    assert "HVO is on" in huge.box.dmem("check", check=False).stdout
