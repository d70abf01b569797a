"""hugetlbfs, as mainline kernels provide it: per-node pools of huge pages, grown and shrunk at run time.

Guests are defined with libvirt's own ``<hugepages>`` XML (see domxml), so libvirt gives QEMU a preallocated
memory-backend-file on its hugetlbfs mount, bound to the cell's host node; QEMU creates and unlinks that file
itself and the kernel zeroes huge pages on fault, so nothing is pinned by the hook.  What this backend adds:

- admission per node against free pages minus what guests that have not faulted yet hold (our in-flight
  reservations, and the kernel's global reserved count for mappings that are not ours);
- growth of only that node's pool of that size, by exactly the shortfall, within ``[hugetlbfs.limit]``;
  what the kernel actually gave is read back, compaction is tried once, and a refusal undoes the growth;
- the ledger's ``grown`` count: pages the tool added per (node, page size), the only pages it gives back,
  and only those that are free and not needed by a guest still starting;
- ``started``: QEMU's guest RAM must be hugetlb memory of that size, bound to and faulted on the node.

Pool files: ``<sysfs>/devices/system/node/node<N>/hugepages/hugepages-<kB>kB/{nr,free,surplus}_hugepages``;
the reserved count exists only globally, in ``<sysfs>/kernel/mm/hugepages/hugepages-<kB>kB/resv_hugepages``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import host as host_module
from .. import log
from ..errors import DmemError, HostError, PlacementError
from ..units import KiB, format_page_size, format_size, parse_size
from . import Finding, Pool, Savings

if TYPE_CHECKING:
    from ..config import Config
    from ..domain import DomainMemory
    from ..host import Host
    from ..ledger import Book, Reservation
    from ..lifecycle import HookContext
    from ..placement import NodeRoom

HUGETLBFS_MAGIC = 0x958458F6
BASE_PAGE = 4096
STRUCT_PAGE_BYTES = 64
HVO_SYSCTL = "vm.hugetlb_optimize_vmemmap"
# Seconds release waits for the pages of a guest that just stopped to reach the free count.
RETURN_WAIT = 2.0


def hvo_saving(page_size: int) -> int:
    """Bytes of vmemmap HVO frees per huge page: its struct pages, but for the one vmemmap page it keeps.

    28 KiB per 2 MiB page and 16,380 KiB per 1 GiB page (mm/hugetlb_vmemmap.c).
    """
    return page_size // BASE_PAGE * STRUCT_PAGE_BYTES - BASE_PAGE


def _pages(size: int, page_size: int) -> int:
    return -(-size // page_size)


class HugetlbfsBackend:
    name = "hugetlbfs"
    label = "hugetlbfs"
    pages = "huge"
    fs_magic = HUGETLBFS_MAGIC
    fs_name = "hugetlbfs"

    def __init__(self, config: Config, host: Host) -> None:
        self.config = config
        self.host = host
        self.sysfs = config.host.sysfs
        self.proc = config.host.proc

    # ---- mounts and page sizes -----------------------------------------------------------------------

    def mounts(self) -> dict[int, Path]:
        """Page size -> the hugetlbfs mount libvirt uses for it: qemu.conf's hugetlbfs_mount, else /proc/mounts.

        ``[hugetlbfs] mount``, when set, comes first for its size.
        """
        mounted = _hugetlbfs_mounts(self.proc / "mounts")
        listed = self.libvirt_mounts()
        found: dict[int, Path] = {}
        own = self.config.hugetlbfs.mount
        if own is not None and own in mounted:
            found[mounted[own]] = own
        for path in listed if listed is not None else list(mounted):
            size = mounted.get(path)
            if size is not None:
                found.setdefault(size, path)
        return found

    def libvirt_mounts(self) -> list[Path] | None:
        """qemu.conf's hugetlbfs_mount (a path or a list of paths); None when unset."""
        value = self.host.qemu_conf_value("hugetlbfs_mount")
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) and item.startswith("/") for item in items):
            raise HostError(f"cannot parse {self.config.libvirt.qemu_conf}: hugetlbfs_mount = {value!r} is not "
                            "an absolute path or a list of them")
        return [Path(str(item)) for item in items]

    @property
    def mount(self) -> Path:
        own = self.config.hugetlbfs.mount
        return own if own is not None else self.mounts()[self.page_size()]

    def _no_mount(self, size: int | None = None) -> str:
        what = f"of {format_page_size(size)} pages " if size else ""
        option = f"pagesize={_mount_option(size)}" if size else "pagesize=2M"
        return (f"no hugetlbfs mount {what}that libvirt uses: mkdir -p /dev/hugepages && mount -t hugetlbfs "
                f"-o {option} none /dev/hugepages, and list it in hugetlbfs_mount in "
                f"{self.config.libvirt.qemu_conf}")

    def page_size(self) -> int:
        """[hugetlbfs] page_size, else that of [hugetlbfs] mount, else that of libvirt's first mount."""
        mounts = self.mounts()
        configured = self.config.hugetlbfs.page_size
        own = self.config.hugetlbfs.mount
        if configured is not None:
            if configured not in mounts:
                raise HostError(self._no_mount(configured))
            return configured
        if own is not None:
            for size, path in mounts.items():
                if path == own:
                    return size
            raise HostError(f"[hugetlbfs] mount {own} is not a hugetlbfs mount in {self.proc / 'mounts'}")
        if not mounts:
            raise HostError(self._no_mount())
        return next(iter(mounts))

    def page_sizes(self) -> tuple[int, ...]:
        return tuple(size for size in sorted(self.mounts()) if self._global_dir(size).is_dir())

    def page_size_for(self, dom: DomainMemory) -> int:
        # An adopted <hugepages> guest keeps its page size when the host can give it.
        if dom.hugepage_size is not None and dom.hugepage_size in self.page_sizes():
            return dom.hugepage_size
        return self.page_size()

    # ---- pools ----------------------------------------------------------------------------------------

    def _global_dir(self, page_size: int) -> Path:
        return self.sysfs / "kernel" / "mm" / "hugepages" / f"hugepages-{page_size // KiB}kB"

    def _node_dir(self, node: int, page_size: int) -> Path:
        return (self.sysfs / "devices" / "system" / "node" / f"node{node}" / "hugepages"
                / f"hugepages-{page_size // KiB}kB")

    def counts(self, node: int, page_size: int) -> tuple[int, int]:
        """(nr_hugepages, free_hugepages) of one node's pool; surplus pages are part of nr."""
        directory = self._node_dir(node, page_size)
        return (host_module.read_decimal(directory / "nr_hugepages"),
                host_module.read_decimal(directory / "free_hugepages"))

    def reserved_pages(self, page_size: int) -> int:
        """Pages mapped but not faulted yet, on all nodes together (the kernel keeps no per-node count)."""
        return host_module.read_decimal(self._global_dir(page_size) / "resv_hugepages")

    def pools(self, page_size: int | None = None) -> dict[int, Pool]:
        size = page_size or self.page_size()
        pools = {}
        for node in self.host.online_nodes():
            nr, free = self.counts(node, size)
            pools[node] = Pool(node, nr * size, free * size)
        return pools

    def _foreign_reserved(self, held: Sequence[Reservation], page_size: int) -> int:
        """Bytes the kernel reserved for mappings that are not our in-flight guests (unknown node)."""
        ours = sum(r.bytes for r in _in_flight(held, page_size))
        return max(0, self.reserved_pages(page_size) * page_size - ours)

    # ---- define time and admission ----------------------------------------------------------------------

    def unsupported(self, dom: DomainMemory, page_size: int) -> str | None:
        from ..domain import unsupported

        return unsupported(dom, page_size, backend="hugetlbfs")

    def rooms(self, held: Sequence[Reservation], page_size: int, *,
              except_uuid: str | None) -> list[NodeRoom]:
        """free - in flight - foreign reserved, plus what the node's limit lets the pool grow by."""
        from ..admission import held_by_domain
        from ..placement import NodeRoom

        foreign = self._foreign_reserved(held, page_size)
        others = [r for r in _in_flight(held, page_size) if r.uuid != except_uuid]
        rooms = []
        for node in self.host.online_nodes():
            nr, free = self.counts(node, page_size)
            growth, note = self._growth(node, nr, page_size)
            reserved = held_by_domain(r for r in others if r.node == node)
            if foreign:
                reserved += (("mappings without dmem-libvirt metadata", foreign),)
            rooms.append(NodeRoom(node, free * page_size + growth, reserved, self.host.node_cpus(node), note))
        return rooms

    def _growth(self, node: int, nr: int, page_size: int) -> tuple[int, str]:
        """Bytes the pool may still grow by, and how a refusal says so."""
        limit = self.config.hugetlbfs.limit.get(node)
        pool = f"{nr} pages of {format_page_size(page_size)}"
        if limit is None:
            return 0, f"the pool ({pool}) is not grown: no [hugetlbfs.limit] for node {node}"
        growth = max(0, limit // page_size - nr) * page_size
        return growth, (f"of that {format_size(growth)} by growing the pool ({pool}) "
                        f"to its limit {format_size(limit)}")

    # ---- lifecycle ------------------------------------------------------------------------------------

    def ready(self, ctx: HookContext, name: str) -> None:
        return None

    def reserve(self, book: Book, name: str, entries: Sequence[Reservation]) -> None:
        """Grow each node's pool by exactly what these entries lack; undo every growth before refusing."""
        if not entries:
            return
        page_size = entries[0].page_size
        uuid = entries[0].uuid
        need: dict[int, int] = defaultdict(int)
        for entry in entries:
            need[entry.node] += entry.bytes
        others = [r for r in book.reservations if r.uuid != uuid]
        foreign = self._foreign_reserved(book.reservations, page_size)
        grown: list[tuple[int, int]] = []   # (node, nr before)
        try:
            for node, size in sorted(need.items()):
                nr, free = self.counts(node, page_size)
                in_flight = sum(r.bytes for r in _in_flight(others, page_size) if r.node == node)
                available = free * page_size - in_flight - foreign
                short = _pages(size - available, page_size) if size > available else 0
                if not short:
                    continue
                limit = self.config.hugetlbfs.limit.get(node)
                what = (f"needs {format_size(size)} of {format_page_size(page_size)} huge pages on host node "
                        f"{node}; {format_size(max(0, available))} free")
                if limit is None or nr + short > limit // page_size:
                    _, why = self._growth(node, nr, page_size)
                    raise PlacementError(f"{what}; {why}", name)
                got = self._grow(node, page_size, nr, nr + short)
                grown.append((node, nr))
                if got < short:
                    raise PlacementError(
                        f"{what}; the kernel grew the pool by only {got} of the {short} pages asked, after "
                        f"compaction (memory too fragmented for {format_page_size(page_size)} pages)", name)
                book.set_grown(node, page_size, book.grown.get((node, page_size), 0) + got)
                log.event("pool-grown", name, node=node, page_size=page_size, pages=got, nr=nr + got)
        except BaseException:
            for node, before in reversed(grown):
                self._shrink(node, page_size, before, name)
            raise

    def _grow(self, node: int, page_size: int, before: int, target: int) -> int:
        """Ask for ``target`` pages on the node; once more after compaction if short; pages gained."""
        now = self._set_pages(node, page_size, target)
        if now < target:
            self.compact(node)
            now = self._set_pages(node, page_size, target)
        return max(0, now - before)

    def _shrink(self, node: int, page_size: int, target: int, name: str | None) -> int:
        """Give the node's pool back down to ``target`` (the kernel frees only free pages); pages freed."""
        nr, _ = self.counts(node, page_size)
        now = self._set_pages(node, page_size, target)
        if now > target:
            log.warning(f"host node {node}'s {format_page_size(page_size)} pool stays at {now} pages, not "
                        f"{target}: the rest are in use", name)
        return max(0, nr - now)

    def _set_pages(self, node: int, page_size: int, pages: int) -> int:
        """Write the node's nr_hugepages and read back what the kernel made of it."""
        path = self._node_dir(node, page_size) / "nr_hugepages"
        try:
            path.write_text(f"{pages}\n")
        except OSError as err:
            # The kernel may refuse part of a request with ENOMEM; what it did is in the read-back.
            log.warning(f"writing {pages} to {path}: {err.strerror}")
        return host_module.read_decimal(path)

    def compact(self, node: int) -> None:
        """Ask the kernel to compact the node's memory, so that contiguous huge pages can be found."""
        path = self.sysfs / "devices" / "system" / "node" / f"node{node}" / "compact"
        try:
            path.write_text("1\n")
        except OSError as err:
            log.warning(f"cannot compact host node {node} ({path}): {err.strerror}")

    def start(self, ctx: HookContext, name: str, dom: DomainMemory, uuid: str, dom_id: str | None) -> None:
        # QEMU makes, maps and faults its own file; only a start that prepare did not see is admitted here.
        from ..lifecycle import reservations_at_start

        reservations_at_start(ctx, name, dom, uuid)

    def verify(self, ctx: HookContext, name: str, pid: int, entries: Sequence[Reservation]) -> list[Reservation]:
        """QEMU's guest RAM for each entry: hugetlb pages of the entry's size, bound to and faulted on its node."""
        from ..procmaps import numa_mappings

        mappings = numa_mappings(ctx.proc, pid)
        verified = []
        for entry in entries:
            # QEMU names the file it creates and unlinks qemu_back_mem.<memory backend id>.XXXXXX.
            marker = f"/qemu_back_mem.{entry.file}."
            found = [m for m in mappings if marker in m.file]
            where = f"QEMU (pid {pid}) guest RAM {entry.file}"
            if not found:
                raise DmemError(f"{where} is not on hugetlbfs (no qemu_back_mem.{entry.file} mapping)", name)
            for mapping in found:
                if not mapping.huge or mapping.page_size != entry.page_size:
                    raise DmemError(f"{where} is in {format_page_size(mapping.page_size)} pages, expected "
                                    f"{format_page_size(entry.page_size)} huge pages", name)
                if mapping.policy != f"bind:{entry.node}":
                    raise DmemError(f"{where} has memory policy {mapping.policy}, expected bind:{entry.node}", name)
                stray = sorted(node for node, pages in mapping.pages.items() if pages and node != entry.node)
                if stray:
                    raise DmemError(f"{where} has pages on host node {', '.join(map(str, stray))}, "
                                    f"expected all on node {entry.node}", name)
            faulted = sum(m.pages.get(entry.node, 0) for m in found) * entry.page_size
            if faulted < entry.bytes:
                raise DmemError(f"{where} has {format_size(faulted)} faulted on host node {entry.node}, "
                                f"expected {format_size(entry.bytes)}", name)
            verified.append(replace(entry, state="pinned"))
        return verified

    def adopt(self, ctx: HookContext, name: str, pid: int | None, dom_id: str | None,
              entries: Sequence[Reservation]) -> list[Reservation]:
        from ..procmaps import alive

        # A running QEMU preallocated its RAM before the guest ran: its pages are out of the free count.
        if pid and alive(ctx.proc, pid):
            return [replace(entry, state="pinned") for entry in entries]
        return list(entries)

    def give_back(self, ctx: HookContext, book: Book, dropped: Sequence[Reservation]) -> None:
        """Shrink each pool the tool grew by its pages that are free and that no starting guest needs."""
        for (node, page_size), grown in sorted(book.grown.items()):
            try:
                returning = sum(_pages(e.bytes, page_size) for e in dropped
                                if e.node == node and e.page_size == page_size and e.state == "pinned")
                nr, spare = self._spare(book, node, page_size, min(grown, returning))
                give = min(grown, spare, nr)
                if give <= 0:
                    continue
                freed = self._shrink(node, page_size, nr - give, None)
                book.set_grown(node, page_size, grown - min(freed, grown))
                log.event("pool-shrunk", None, node=node, page_size=page_size, pages=freed, nr=nr - freed)
            except (DmemError, OSError) as err:
                log.warning(f"cannot give back host node {node}'s {format_page_size(page_size)} pages: {err}")

    def _spare(self, book: Book, node: int, page_size: int, expected: int) -> tuple[int, int]:
        """(nr, free pages no in-flight guest needs), waiting briefly for ``expected`` pages to come back.

        libvirt runs release once QEMU is gone, but the last reference to its hugetlbfs file (and so its
        pages) may be dropped a moment later, outside the exiting process.
        """
        deadline = time.monotonic() + RETURN_WAIT
        while True:
            nr, free = self.counts(node, page_size)
            in_flight = sum(r.bytes for r in _in_flight(book.reservations, page_size) if r.node == node)
            spare = free - _pages(in_flight + self._foreign_reserved(book.reservations, page_size), page_size)
            if spare >= expected or time.monotonic() >= deadline:
                return nr, spare
            time.sleep(0.02)

    def fill(self) -> Callable[[int, int], None] | None:
        return None

    def allocated(self, domain: str, path: Path, node: int, size: int) -> None:
        return None

    def released(self, path: Path) -> None:
        return None

    # ---- operating views ------------------------------------------------------------------------------

    def hvo(self) -> bool | None:
        """HugeTLB Vmemmap Optimization: True on, False off, None when this kernel has no such sysctl."""
        path = self.proc / "sys" / "vm" / "hugetlb_optimize_vmemmap"
        if not path.exists():
            return None
        return host_module.read_decimal(path) != 0

    def memmap_bytes(self) -> int | None:
        """The kernel's struct page memory now (after folding per-CPU counters when allowed), or None."""
        # Per-CPU deltas of the vmstat counters are folded only on this write (root only).
        with contextlib.suppress(OSError):
            (self.proc / "sys" / "vm" / "stat_refresh").write_text("1\n")
        try:
            text = (self.proc / "vmstat").read_text()
        except OSError:
            return None
        values = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
        if "nr_memmap_pages" not in values or "nr_memmap_boot_pages" not in values:
            return None
        return (int(values["nr_memmap_pages"]) + int(values["nr_memmap_boot_pages"])) * BASE_PAGE

    def online_memory(self) -> int | None:
        """Bytes of online memory blocks: the memory a full vmemmap describes."""
        directory = self.sysfs / "devices" / "system" / "memory"
        try:
            block = int((directory / "block_size_bytes").read_text().strip(), 16)
            names = [entry.name for entry in os.scandir(directory) if entry.name.startswith("memory")]
            online = sum(1 for name in names if (directory / name / "state").read_text().strip() == "online")
        except (OSError, ValueError):
            return None
        return online * block

    def savings(self) -> Savings:
        """Measured: a full vmemmap minus the kernel's memmap counters; else computed from the pools and HVO."""
        memmap, memory = self.memmap_bytes(), self.online_memory()
        if memmap is not None and memory is not None:
            full = memory // BASE_PAGE * STRUCT_PAGE_BYTES
            return Savings(max(0, full - memmap), True,
                           "vmemmap freed by HVO: 64 B per 4 KiB of online memory minus /proc/vmstat "
                           "nr_memmap_pages + nr_memmap_boot_pages")
        if not self.hvo():
            return Savings(0, False, f"HVO is off ({HVO_SYSCTL})")
        saved = 0
        for size in self.page_sizes():
            saved += sum(pool.total // size for pool in self.pools(size).values()) * hvo_saving(size)
        return Savings(saved, False, "28 KiB per 2 MiB page and 16,380 KiB per 1 GiB page in the pools, "
                                     "if HVO was on when they were allocated")

    def check(self, ctx: HookContext) -> list[Finding]:
        return [self._check_mount(), *self._check_limits(), self._check_hvo()]

    def _check_mount(self) -> Finding:
        try:
            size = self.page_size()
            mount = self.mounts()[size]
        except DmemError as err:
            return Finding(False, err.message, "mount hugetlbfs and list it in qemu.conf's hugetlbfs_mount")
        listed = self.libvirt_mounts()
        qemu_conf = self.config.libvirt.qemu_conf
        if listed is not None and mount not in listed:
            return Finding(False, f"{mount} is not in hugetlbfs_mount of {qemu_conf}: libvirt will not use it",
                           f'add "{mount}" to hugetlbfs_mount in {qemu_conf} and restart libvirtd')
        return Finding(True, f"{mount} is a hugetlbfs mount of {format_page_size(size)} pages that libvirt uses")

    def _check_limits(self) -> list[Finding]:
        try:
            size = self.page_size()
            nodes = self.host.online_nodes()
        except DmemError as err:
            return [Finding(False, err.message)]
        findings = []
        limits = self.config.hugetlbfs.limit
        for node in sorted(set(limits) - set(nodes)):
            findings.append(Finding(False, f"[hugetlbfs.limit] names host node {node}, which is not online",
                                    f"remove it from {self.config.source or 'the config'}"))
        for node in nodes:
            nr, free = self.counts(node, size)
            pool = f"host node {node}: {nr} pages of {format_page_size(size)} ({free} free)"
            if node in limits:
                findings.append(Finding(True, f"{pool}, may grow to {format_size(limits[node])}"))
            else:
                findings.append(Finding(True, f"{pool}, used as sized (no [hugetlbfs.limit])"))
        return findings

    def _check_hvo(self) -> Finding:
        state = self.hvo()
        if state is None:
            return Finding(False, f"HVO is not supported: {self.proc}/sys/vm/hugetlb_optimize_vmemmap is missing",
                           "run a kernel with CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP (5.14 or later)")
        if not state:
            return Finding(False, "HVO is off: each huge page keeps all its struct pages",
                           f"sysctl {HVO_SYSCTL}=1 (or hugetlb_free_vmemmap=on at boot); pages already in a "
                           "pool keep their vmemmap until they are freed")
        return Finding(True, "HVO is on: huge pages allocated from now on free most of their struct pages")


def _in_flight(held: Sequence[Reservation], page_size: int) -> list[Reservation]:
    """Our reservations of this page size whose QEMU has not faulted them yet (they still count as free)."""
    return [r for r in held if r.page_size == page_size and r.backend == "hugetlbfs" and r.state == "reserved"]


def _mount_option(size: int) -> str:
    return f"{size // (1 << 30)}G" if size >= (1 << 30) else f"{size // (1 << 20)}M"


def _hugetlbfs_mounts(path: Path) -> dict[Path, int]:
    """hugetlbfs mount points of /proc/mounts (in order) -> page size (the pagesize= option the kernel shows)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise HostError(f"cannot read {path}: {err.strerror}") from None
    found: dict[Path, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        options = dict(option.partition("=")[::2] for option in fields[3].split(","))
        try:
            size = parse_size(options.get("pagesize", ""))
        except ValueError:
            raise HostError(f"cannot parse {path}: {line!r} has no pagesize= option") from None
        # Mount points escape blanks and backslashes as octal (\040).
        point = Path(fields[1].encode().decode("unicode_escape"))
        found.setdefault(point, size)
    return found
