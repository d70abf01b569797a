"""dmemfs, as the RFC kernel provides it: capacity from debugfs (or statfs), pages freed by the kernel on unlink.

Page size: debugfs ``dpage_shift``, else statfs of the mount (dmemfs fills f_bsize), else [dmemfs] page_size.
Pools: debugfs ``node<N>/{total,free}_dpages``, else the capacity the config declares.  The hook pins guest
RAM files itself (lifecycle.pin_files) because QEMU cannot size a dmemfs file; the kernel does all page
accounting, so `allocated`/`released` do nothing here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .. import host as host_module
from ..errors import DmemError, HostError
from ..units import GiB, KiB, MiB, format_page_size
from . import Finding, Pool, Savings

if TYPE_CHECKING:
    from pathlib import Path

    from ..config import Config
    from ..domain import DomainMemory
    from ..host import Host
    from ..ledger import Book, Reservation
    from ..lifecycle import HookContext
    from ..placement import NodeRoom

DMEMFS_MAGIC = 0x2ACE90C6
VALID_PAGE_SIZES = (4 * KiB, 2 * MiB, GiB)
# A 64-byte struct page for every 4 KiB page: what memory managed without struct page saves.
STRUCT_PAGE_BYTES = 64
BASE_PAGE = 4096

_NODE_DIR = re.compile(r"node([0-9]+)")
_MOUNT_DEBUGFS = "mount -t debugfs none /sys/kernel/debug"


class DmemfsBackend:
    name = "dmemfs"
    label = "dmemfs"
    pages = "dmem"
    fs_magic = DMEMFS_MAGIC
    fs_name = "dmemfs"

    def __init__(self, config: Config, host: Host) -> None:
        self.config = config
        self.host = host
        self.mount = config.dmemfs.mount
        self.debugfs = config.dmemfs.debugfs

    # ---- page size and pools -----------------------------------------------------------------------

    def debugfs_available(self) -> bool:
        """True when the dmem debugfs directory can be read (debugfs mounted, kernel built with it)."""
        return os.access(self.debugfs / "dpage_shift", os.R_OK)

    def page_size(self) -> int:
        """Bytes per dmem page: debugfs dpage_shift, else statfs of the mount, else [dmemfs] page_size."""
        configured = self.config.dmemfs.page_size
        if configured is not None and configured not in VALID_PAGE_SIZES:
            raise HostError(f"[dmemfs] page_size {configured} bytes is not a dmem page size "
                            f"(expected 4K, 2M or 1G)")
        kernel, source = self._kernel_page_size()
        if kernel is None:
            if configured is None:
                raise HostError(
                    f"cannot tell the dmem page size: {self.debugfs / 'dpage_shift'} is missing or "
                    f"reads 0 and {self.mount} is not a mounted dmemfs; mount dmemfs "
                    f"(mount -t dmemfs none -o pagesize=2M {self.mount}), mount debugfs "
                    f"({_MOUNT_DEBUGFS}) or set [dmemfs] page_size in the config")
            return configured
        if kernel not in VALID_PAGE_SIZES:
            raise HostError(f"{source} gives a dmem page size of {kernel} bytes; "
                            f"expected 4 KiB, 2 MiB or 1 GiB")
        if configured is not None and configured != kernel:
            raise HostError(f"[dmemfs] page_size is {format_page_size(configured)} but {source} says "
                            f"{format_page_size(kernel)}; fix the config or remount dmemfs")
        return kernel

    def page_sizes(self) -> tuple[int, ...]:
        # One page size per host: a second dmemfs mount with another size fails with EBUSY.
        return (self.page_size(),)

    def page_size_for(self, dom: DomainMemory) -> int:
        return self.page_size()

    def pools(self, page_size: int | None = None) -> dict[int, Pool]:
        """Per node that has dmem: total and free bytes (debugfs, else [dmemfs] capacity)."""
        if self.debugfs_available():
            return self._debugfs_pools()
        capacity = self.config.dmemfs.capacity
        if capacity:
            # Without the kernel's counts, free is the declared capacity: the ledger accounts for usage.
            return {node: Pool(node, size, size) for node, size in sorted(capacity.items())}
        raise HostError(
            f"no dmem statistics: {self.debugfs} cannot be read (debugfs not mounted, or a kernel "
            f"without CONFIG_DMEM_DEBUG_FS); mount it ({_MOUNT_DEBUGFS}) or set [dmemfs.capacity] "
            f"in the config")

    def _kernel_page_size(self) -> tuple[int | None, str]:
        shift_path = self.debugfs / "dpage_shift"
        if self.debugfs_available():
            shift = host_module.read_decimal(shift_path)
            # The RFC sets dpage_shift when dmemfs is first mounted; before that it reads 0.
            if shift:
                if shift >= 64:
                    raise HostError(f"cannot parse {shift_path}: shift {shift} is out of range")
                return 1 << shift, str(shift_path)
        try:
            magic, block_size = host_module.statfs(self.mount)
        except FileNotFoundError:
            return None, ""
        except OSError as err:
            raise HostError(f"cannot statfs {self.mount}: {err.strerror}") from None
        # dmemfs fills f_bsize with its page size (and leaves the block counts empty).
        if magic == DMEMFS_MAGIC:
            return block_size, f"statfs({self.mount})"
        return None, ""

    def _debugfs_pools(self) -> dict[int, Pool]:
        nodes = self._debugfs_nodes()
        read = host_module.read_decimal
        counts = {node: (read(self.debugfs / f"node{node}" / "total_dpages"),
                         read(self.debugfs / f"node{node}" / "free_dpages")) for node in nodes}
        unmounted = not read(self.debugfs / "dpage_shift")
        if unmounted and not any(total for total, _ in counts.values()):
            raise HostError(f"dmemfs has not been mounted since boot ({self.debugfs} counts read 0 until "
                            f"then): mount -t dmemfs none -o pagesize=2M {self.mount}")
        page = self.page_size()
        pools = {}
        for node, (total, free) in counts.items():
            if free > total:
                raise HostError(f"{self.debugfs / f'node{node}'} reports {free} free dmem pages of "
                                f"{total} total")
            pools[node] = Pool(node, total * page, free * page)
        return pools

    def _debugfs_nodes(self) -> list[int]:
        # The RFC creates node<N>/ only for nodes that have dmem.
        try:
            names = os.listdir(self.debugfs)
        except OSError as err:
            raise HostError(f"cannot list {self.debugfs}: {err.strerror}") from None
        return sorted(int(m.group(1)) for name in names if (m := _NODE_DIR.fullmatch(name)))

    # ---- define time -------------------------------------------------------------------------------

    def unsupported(self, dom: DomainMemory, page_size: int) -> str | None:
        from ..domain import unsupported

        return unsupported(dom, page_size, backend="dmemfs")

    def rooms(self, held: Sequence[Reservation], page_size: int, *,
              except_uuid: str | None) -> list[NodeRoom]:
        from ..admission import node_rooms

        pools = self.pools()
        local_cpus = {node: self.host.node_cpus(node) for node in pools}
        return node_rooms(pools, held, local_cpus, except_uuid=except_uuid)

    # ---- lifecycle ----------------------------------------------------------------------------------

    def ready(self, ctx: HookContext, name: str) -> None:
        from ..lifecycle import backing_dir_on_backend

        if not backing_dir_on_backend(ctx):
            # libvirt would put the guest's RAM files elsewhere and start begin would refuse them:
            # refuse now, before any page is booked.
            raise DmemError(f"memory_backing_dir {ctx.host.memory_backing_dir()} is not on the {self.fs_name} "
                            f"mount {self.mount}; set memory_backing_dir = \"{self.mount}\" in qemu.conf", name)

    def reserve(self, book: Book, name: str, entries: Sequence[Reservation]) -> None:
        return None

    def start(self, ctx: HookContext, name: str, dom: DomainMemory, uuid: str, dom_id: str | None) -> None:
        from ..lifecycle import pin_files

        pin_files(ctx, name, dom, uuid, dom_id)

    def verify(self, ctx: HookContext, name: str, pid: int, entries: Sequence[Reservation]) -> list[Reservation]:
        from ..lifecycle import verify_files

        return verify_files(ctx, name, pid, entries)

    def adopt(self, ctx: HookContext, name: str, pid: int | None, dom_id: str | None,
              entries: Sequence[Reservation]) -> list[Reservation]:
        from ..lifecycle import files_on_mount

        return files_on_mount(ctx, name, dom_id, entries)

    def give_back(self, ctx: HookContext, book: Book, dropped: Sequence[Reservation]) -> None:
        return None

    def fill(self) -> Callable[[int, int], None] | None:
        return None

    def allocated(self, domain: str, path: Path, node: int, size: int) -> None:
        return None

    def released(self, path: Path) -> None:
        return None

    # ---- operating views ----------------------------------------------------------------------------

    def savings(self) -> Savings:
        total = sum(pool.total for pool in self.pools().values())
        return Savings(total // BASE_PAGE * STRUCT_PAGE_BYTES, False,
                       f"{STRUCT_PAGE_BYTES} B per {BASE_PAGE // KiB} KiB page of the pools")

    def check(self, ctx: HookContext) -> list[Finding]:
        return [self._check_mount(), _check_backing_dir(ctx), self._check_debugfs(), self._check_page_size()]

    def mount_command(self) -> str:
        return (f"mkdir -p {self.mount} && mount -t dmemfs none -o pagesize=2M {self.mount} "
                "(see examples/dev-dmem.mount)")

    def _check_mount(self) -> Finding:
        try:
            magic = host_module.fs_magic(self.mount)
        except OSError as err:
            return Finding(False, f"{self.mount} cannot be examined: {err.strerror}", self.mount_command())
        if magic != self.fs_magic:
            return Finding(False, f"{self.mount} is not a {self.fs_name} mount (filesystem magic {magic:#x}, "
                                  f"expected {self.fs_magic:#x})", self.mount_command())
        return Finding(True, f"{self.mount} is a {self.fs_name} mount")

    def _check_debugfs(self) -> Finding:
        if self.debugfs_available():
            return Finding(True, f"dmem statistics in {self.debugfs} readable")
        if self.config.dmemfs.capacity:
            return Finding(True, f"dmem statistics in {self.debugfs} unreadable; using [dmemfs.capacity]")
        return Finding(False, f"dmem statistics in {self.debugfs} unreadable and no [dmemfs.capacity] declared",
                       f"mount -t debugfs none {self.debugfs.parent}, or declare [dmemfs.capacity] per node "
                       f"in {self.config.source or 'the config'}")

    def _check_page_size(self) -> Finding:
        try:
            page_size = self.page_size()
        except DmemError as err:
            return Finding(False, err.message, "make [dmemfs] page_size match the mount's pagesize=")
        if page_size >= GiB:
            # QEMU reads a backing file's page size only on hugetlbfs, and libvirt cannot ask for align=1G.
            return Finding(False, f"page size {format_page_size(page_size)}: libvirt cannot align guest RAM "
                                  f"to {format_page_size(page_size)} on dmemfs, so no guest can use it",
                           f"remount with -o pagesize=2M: {self.mount_command()}")
        return Finding(True, f"page size {format_page_size(page_size)}")


def _check_backing_dir(ctx: HookContext) -> Finding:
    from ..install import daemon_name
    from ..lifecycle import backing_dir_on_backend

    mount = ctx.backend.mount
    qemu_conf = ctx.config.libvirt.qemu_conf
    try:
        backing = ctx.host.memory_backing_dir()
    except DmemError as err:
        return Finding(False, err.message, f"fix memory_backing_dir in {qemu_conf}")
    if backing_dir_on_backend(ctx):
        return Finding(True, f"libvirt memory_backing_dir {backing} is on {mount}")
    return Finding(False, f"libvirt memory_backing_dir {backing} is not on {mount}",
                   f'set memory_backing_dir = "{mount}" in {qemu_conf} and restart {daemon_name(ctx.run_dir)}')
