"""The guest lifecycle as the libvirt hook drives it: admit, pin, verify, unpin, re-adopt, receive.

Each function takes the hook's context, the domain name and its parsed XML, and either returns or
raises a DmemError whose line the hook prints.  Ledger changes happen under the host lock, held only
for decisions; pinning (zeroing gigabytes) happens outside it.  Nothing here talks to libvirt.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import log, procmaps, runtime
from .admission import cell_needs
from .backends import Backend, open_backend
from .backends.dmemfs import DMEMFS_MAGIC
from .config import Config
from .domain import DmemMetadata, DomainMemory, backing_files, read_domain
from .errors import DmemError, HostError, PinError, PlacementError
from .host import Host, fs_magic
from .ledger import Book, Ledger, Reservation
from .placement import NodeRoom, place
from .units import format_page_size, format_size


@dataclass
class HookContext:
    """Everything an operation reads or changes on the host."""

    config: Config
    host: Host
    backend: Backend
    ledger: Ledger
    clock: Callable[[], float] = field(default=time.time)

    @classmethod
    def create(cls, config: Config) -> HookContext:
        host = Host(config)
        ledger = Ledger(config.state.dir, host.boot_id(), lock_timeout=config.state.lock_timeout)
        return cls(config, host, open_backend(config, host), ledger)

    @property
    def proc(self) -> Path:
        return self.config.host.proc

    @property
    def run_dir(self) -> Path:
        return self.config.libvirt.run_dir

    def rooms(self, held: Sequence[Reservation], *, except_uuid: str | None,
              page_size: int | None = None) -> list[NodeRoom]:
        """Each pool's room for a domain, given what the ledger holds (``except_uuid``'s own entries aside)."""
        return self.backend.rooms(held, page_size or self.backend.page_size(), except_uuid=except_uuid)

    def rebuild(self) -> list[Reservation]:
        return rebuild_from_running(self)

    def count(self, family: str, label: str) -> None:
        """Count one event since boot (counters.py); a counter that cannot be written never fails a guest."""
        from . import counters

        try:
            counters.add(self.config.state.dir, self.ledger.boot_id, family, label)
        except DmemError as err:
            log.warning(f"cannot count {family} {label}: {err.message}")


# ---- checks shared by several operations -------------------------------------------------------


def backing_dir_on_backend(ctx: HookContext) -> bool:
    """True when libvirt's host-wide memory_backing_dir puts file-backed RAM on our filesystem."""
    backing = ctx.host.memory_backing_dir()
    try:
        real_backing, real_mount = backing.resolve(), ctx.backend.mount.resolve()
    except (OSError, HostError):
        # HostError: a backend without a mount yet (hugetlbfs unmounted) cannot hold anyone's RAM.
        return False
    if real_backing == real_mount or real_mount in real_backing.parents:
        return True
    try:
        return fs_magic(real_backing) == DMEMFS_MAGIC
    except OSError:
        return False


def check_metadata(ctx: HookContext, name: str, meta: DmemMetadata, *, arriving: str | None = None) -> int:
    """The host's page size, after checking that the domain was defined for this backend and size.

    ``arriving`` ("migrate", "restore"): the guest comes from another host, so the remedy is another
    destination, not a new definition (its RAM and its source's definition are laid out for that size).
    """
    if meta.backend != ctx.backend.name:
        raise DmemError(f"defined for the {meta.backend} backend but this host runs {ctx.backend.name}; "
                        f"{_remedy(name, meta, arriving)}", name)
    sizes = ctx.backend.page_sizes()
    if meta.page_size not in sizes:
        used = " or ".join(format_page_size(size) for size in sizes)
        raise DmemError(f"defined for {format_page_size(meta.page_size)} pages but host {ctx.backend.name} uses "
                        f"{used} pages; {_remedy(name, meta, arriving)}", name)
    return meta.page_size


def _remedy(name: str, meta: DmemMetadata, arriving: str | None) -> str:
    if arriving is None:
        return f"run 'dmem-libvirt enable {name}' again"
    where = "to" if arriving == "migrate" else "on"
    return f"{arriving} it {where} a host with {format_page_size(meta.page_size)} {meta.backend} pages"


def _uuid(dom: DomainMemory, name: str) -> str:
    if not dom.uuid:
        raise DmemError("domain XML has no <uuid>", name)
    return dom.uuid


def _recorded_placement(dom: DomainMemory) -> dict[int, int]:
    """Guest cell -> host node, as the domain's metadata records it (cells the host chooses left out)."""
    return {placed.cell: placed.node for placed in backing_files(dom) if placed.node is not None}


def _new_reservations(ctx: HookContext, name: str, uuid: str, dom: DomainMemory,
                      placement: dict[int, int], origin: str) -> list[Reservation]:
    assert dom.metadata is not None
    now = ctx.clock()
    return [
        Reservation(domain=name, uuid=uuid, node=placement[placed.cell], bytes=placed.size,
                    page_size=dom.metadata.page_size, backend=dom.metadata.backend, file=placed.file,
                    state="reserved", origin=origin, created=now)
        for placed in backing_files(dom)
    ]


def _admit(ctx: HookContext, book: Book, name: str, uuid: str, dom: DomainMemory, page_size: int,
           *, fixed: dict[int, int] | None) -> dict[int, int]:
    assert dom.metadata is not None
    rooms = ctx.rooms(book.reservations, except_uuid=uuid, page_size=page_size)
    if dom.metadata.allowed:
        rooms = [room for room in rooms if room.node in dom.metadata.allowed]
    return place(name, cell_needs(dom), rooms, page_size, fixed=fixed, cellless=dom.metadata.cellless,
                 kind=ctx.backend.pages)


def _book(ctx: HookContext, book: Book, name: str, entries: list[Reservation]) -> None:
    """Record new entries and let the backend make its pools hold them (it undoes its own change on refusal)."""
    for entry in entries:
        book.add(entry)
    ctx.backend.reserve(book, name, entries)


def _log_reservations(action: str, entries: Iterable[Reservation], **extra: object) -> None:
    for entry in entries:
        log.event(action, entry.domain, uuid=entry.uuid, node=entry.node, bytes=entry.bytes,
                  file=entry.file, state=entry.state, **extra)


# ---- giving memory back --------------------------------------------------------------------------


def _mappers(ctx: HookContext, path: Path | str, inode: int | None = None) -> list[int] | None:
    """Pids mapping the file at ``path``; None when there is no such file (or it is not ``inode``)."""
    try:
        info = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if inode is not None and info.st_ino != inode:
        return None
    return procmaps.mappers(ctx.proc, info.st_dev, info.st_ino)


def _drop(ctx: HookContext, book: Book, entries: list[Reservation], action: str) -> list[Reservation]:
    """Remove entries from the book, delete their files, return pinned pages; returns the entries kept.

    A file some process still maps keeps its pages whatever we do: its entry stays booked (and counted)
    until the mapping is gone, when collecting orphans or the guest's next prepare drops it.
    """
    kept, dropped = [], []
    for entry in entries:
        if entry.path:
            path = Path(entry.path)
            users = _mappers(ctx, path, entry.inode)
            if users:
                log.warning(f"{path} is still mapped by pid {users[0]}; its pages stay booked", entry.domain)
                kept.append(entry)
                continue
            if users is not None:
                from .pin import remove_file

                remove_file(path.parent, path.name)
            # Also when libvirt removed the file first: its pages are back either way.
            ctx.backend.released(path)
        book.remove_entry(entry)
        dropped.append(entry)
    _log_reservations(action, dropped)
    ctx.backend.give_back(ctx, book, dropped)
    return kept


def _same_process(ctx: HookContext, pid: int, started_at: int | None) -> bool:
    """``pid`` is alive and, when its start time was recorded, still the process it was then."""
    if not procmaps.alive(ctx.proc, pid):
        return False
    return started_at is None or procmaps.start_ticks(ctx.proc, pid) == started_at


def _group_alive(ctx: HookContext, group: list[Reservation]) -> bool:
    recorded = {entry.pid: entry.pid_start for entry in group if entry.pid}
    if any(_same_process(ctx, pid, started_at) for pid, started_at in recorded.items()):
        return True
    name = group[0].domain
    if (ctx.run_dir / f"{name}.xml").exists():
        try:
            pid = runtime.read_pid(ctx.run_dir, name)
        except DmemError:
            # Another guest's damaged pid file must not fail this guest's start: treat it as alive.
            return True
        # A pid we recorded with its start time is judged by it: the pid may have been recycled.
        if pid and _same_process(ctx, pid, recorded.get(pid)):
            return True
    return any(entry.path and _mappers(ctx, entry.path) for entry in group)


@dataclass(frozen=True)
class Orphan:
    """Reservations of one domain, or one per-domain directory, that no live guest owns: what and why."""

    what: str
    why: str
    entries: tuple[Reservation, ...] = ()
    directory: Path | None = None


def find_orphans(ctx: HookContext, reservations: Sequence[Reservation], *,
                 keep_uuid: str | None = None) -> list[Orphan]:
    """What `collect_orphans` would free, changing nothing."""
    now = ctx.clock()
    grace = ctx.config.state.orphan_grace
    found: list[Orphan] = []
    groups: dict[str, list[Reservation]] = defaultdict(list)
    for entry in reservations:
        groups[entry.uuid].append(entry)
    for uuid, group in sorted(groups.items()):
        if uuid == keep_uuid or any(now - entry.created < grace for entry in group):
            continue
        if _group_alive(ctx, group):
            continue
        pids = sorted({entry.pid for entry in group if entry.pid})
        qemu = f"QEMU pid {', '.join(map(str, pids))} is gone" if pids else "no QEMU ever recorded"
        age = now - max(entry.created for entry in group)
        found.append(Orphan(
            f"{group[0].domain} ({format_size(sum(e.bytes for e in group))} on "
            f"node {', '.join(str(n) for n in sorted({e.node for e in group}))})",
            f"{qemu}, libvirt runs no such guest, nothing maps its files; reserved {age:.0f} s ago",
            tuple(group)))
    if backing_dir_on_backend(ctx):
        found.extend(_orphan_dirs(ctx, now, grace))
    return found


def collect_orphans(ctx: HookContext, book: Book, *, keep_uuid: str | None = None) -> list[str]:
    """Free reservations and per-domain directories no live guest owns and older than the grace period."""
    freed: list[str] = []
    for orphan in find_orphans(ctx, book.reservations, keep_uuid=keep_uuid):
        if orphan.directory is None:
            _drop(ctx, book, list(orphan.entries), "orphan-freed")
            freed.append(orphan.what)
        elif _remove_orphan_dir(orphan.directory):
            freed.append(orphan.what)
    return freed


def _orphan_dirs(ctx: HookContext, now: float, grace: float) -> list[Orphan]:
    running = {name[: runtime.SHORT_NAME_MAX] for name in runtime.running_names(ctx.run_dir)}
    found = []
    for directory in runtime.all_domain_dirs(ctx.host.memory_backing_dir()):
        if directory.name.partition("-")[2] in running:
            continue
        try:
            if now - directory.stat().st_mtime < grace:
                continue
            files = [f for f in os.scandir(directory) if f.is_file(follow_symlinks=False)]
            if any(_mappers(ctx, f.path) for f in files):
                continue
            size = sum(f.stat().st_blocks * 512 for f in files)
        except OSError as err:
            log.warning(f"cannot examine orphan directory {directory}: {err}")
            continue
        found.append(Orphan(f"{directory} ({format_size(size)})",
                            "no running guest has this memory directory and nothing maps its files",
                            directory=directory))
    return found


def _remove_orphan_dir(directory: Path) -> bool:
    from .pin import remove_file

    try:
        files = [f for f in os.scandir(directory) if f.is_file(follow_symlinks=False)]
        size = sum(f.stat().st_blocks * 512 for f in files)
        for f in files:
            remove_file(directory, f.name)
        directory.rmdir()
    except OSError as err:
        log.warning(f"cannot collect orphan directory {directory}: {err}")
        return False
    log.event("orphan-dir-freed", None, path=directory, bytes=size)
    return True


def rebuild_from_running(ctx: HookContext) -> list[Reservation]:
    """Reservations of every running guest with our metadata, from libvirt's status files and /proc."""
    rebuilt: list[Reservation] = []
    for running in runtime.running_domains(ctx.run_dir):
        try:
            dom = read_domain(running.domain)
            if dom.metadata is None:
                from .adopt import for_running

                dom = for_running(ctx, running.domain, dom, running.pid)
        except DmemError:
            continue
        if dom.metadata is None or not dom.uuid:
            continue
        if not (running.pid and procmaps.alive(ctx.proc, running.pid)):
            continue
        rebuilt.extend(_found_on_mount(ctx, running.name, dom, running.pid, "rebuilt",
                                       running.domain.get("id")))
    _log_reservations("rebuilt", rebuilt)
    return rebuilt


def _found_on_mount(ctx: HookContext, name: str, dom: DomainMemory, pid: int | None, origin: str,
                    dom_id: str | None) -> list[Reservation]:
    assert dom.metadata is not None and dom.uuid
    started_at = procmaps.start_ticks(ctx.proc, pid) if pid else None
    # An adopted guest's cell whose node nothing shows (no <numatune>, no pages found) cannot be booked.
    entries = [Reservation(domain=name, uuid=dom.uuid, node=placed.node, bytes=placed.size,
                           page_size=dom.metadata.page_size, backend=dom.metadata.backend,
                           file=placed.file, state="reserved", origin=origin, created=ctx.clock(), pid=pid,
                           pid_start=started_at)
               for placed in backing_files(dom) if placed.node is not None]
    return ctx.backend.adopt(ctx, name, pid, dom_id, entries)


def files_on_mount(ctx: HookContext, name: str, dom_id: str | None,
                   entries: Sequence[Reservation]) -> list[Reservation]:
    """File-backed backends: an entry whose file exists in the guest's memory directory is pinned."""
    directories = runtime.domain_dir_candidates(ctx.host.memory_backing_dir(), name, dom_id)
    found = []
    for entry in entries:
        for directory in directories:
            try:
                info = os.stat(directory / entry.file, follow_symlinks=False)
            except OSError:
                continue
            entry = replace(entry, state="pinned", path=str(directory / entry.file), inode=info.st_ino)
            break
        found.append(entry)
    return found


# ---- the operations -------------------------------------------------------------------------------


def prepare(ctx: HookContext, name: str, dom: DomainMemory) -> None:
    """``prepare begin``: admit or refuse, and record a reservation per backing file."""
    if dom.metadata is None:
        if dom.file_backed and backing_dir_on_backend(ctx):
            raise DmemError(f"memory_backing_dir is on {ctx.backend.name}; "
                            f"run 'dmem-libvirt enable {name}' or use memfd", name)
        return
    uuid = _uuid(dom, name)
    page_size = check_metadata(ctx, name, dom.metadata)
    ctx.backend.ready(ctx, name)
    wanted = _recorded_placement(dom)
    refused: DmemError | None = None
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        collect_orphans(ctx, book, keep_uuid=uuid)
        mine = book.for_uuid(uuid)
        try:
            if mine:
                _refuse_still_mapped(name, _drop(ctx, book, mine, "stale-dropped"))
            placement = _admit(ctx, book, name, uuid, dom, page_size, fixed=wanted)
        except DmemError as err:
            # The orphans and stale entries dropped above are gone (files removed, pages given back):
            # the ledger must say so even though this guest is refused.
            refused = err
        else:
            entries = _new_reservations(ctx, name, uuid, dom, placement, "prepare")
            _book(ctx, book, name, entries)
    if refused is not None:
        raise refused
    _log_reservations("admit", entries)
    ctx.count("admissions", "prepare")


def _refuse_still_mapped(name: str, kept: list[Reservation]) -> None:
    if kept:
        raise PinError(f"{kept[0].path} of this guest's last run is still mapped by a process; "
                       f"its {format_size(kept[0].bytes)} on host node {kept[0].node} stay booked until it exits",
                       name)


def start(ctx: HookContext, name: str, dom: DomainMemory, dom_id: str | None) -> None:
    """``start begin``: create, size, bind, zero and hand over every backing file (pin)."""
    if dom.metadata is None:
        return
    uuid = _uuid(dom, name)
    try:
        ctx.backend.start(ctx, name, dom, uuid, dom_id)
    except BaseException:
        # The guest will not run: give its pages back now rather than wait for release end, which
        # libvirt runs after a failed start but which may be delayed or lost with the daemon.
        _release_quietly(ctx, name, uuid)
        raise


def reservations_at_start(ctx: HookContext, name: str, dom: DomainMemory, uuid: str) -> list[Reservation]:
    """This guest's entries at ``start begin``, admitting it now if ``prepare`` did not run for this start."""
    assert dom.metadata is not None
    page_size = check_metadata(ctx, name, dom.metadata)
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        mine = book.for_uuid(uuid)
        admitted = not mine
        if admitted:
            # prepare did not run for this start (e.g. the hook was installed in between): admit now.
            placement = _admit(ctx, book, name, uuid, dom, page_size, fixed=_recorded_placement(dom))
            mine = _new_reservations(ctx, name, uuid, dom, placement, "start")
            _book(ctx, book, name, mine)
    if admitted:
        ctx.count("admissions", "start")
    return mine


def pin_files(ctx: HookContext, name: str, dom: DomainMemory, uuid: str, dom_id: str | None) -> None:
    """File-backed backends at ``start begin``: create, size, bind, zero and hand over every backing file."""
    from .pin import remove_file

    assert dom.metadata is not None
    page_size = check_metadata(ctx, name, dom.metadata)
    directory = _domain_dir(ctx, name, dom_id)
    mine = reservations_at_start(ctx, name, dom, uuid)
    owner = directory.stat()
    threads = ctx.config.pin.threads
    pinned: list[Reservation] = []
    try:
        for entry in mine:
            pinned.append(_pin_one(ctx, name, directory, entry, page_size, owner.st_uid, owner.st_gid, threads))
        with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
            book.replace_uuid(uuid, pinned)
    except BaseException:
        for entry in pinned:
            remove_file(directory, entry.file)
            ctx.backend.released(directory / entry.file)
        raise
    _log_reservations("pin", pinned, dir=directory)


def _domain_dir(ctx: HookContext, name: str, dom_id: str | None) -> Path:
    backing = ctx.host.memory_backing_dir()
    found = runtime.domain_dir_candidates(backing, name, dom_id)
    if not found:
        raise PinError(f"libvirt's memory directory for this guest is missing under {backing} "
                       f"(looked for {runtime.short_name(dom_id or '<id>', name)} in both layouts)", name)
    directory = found[0]
    magic = fs_magic(directory)
    mount = ctx.backend.mount.resolve()
    real = directory.resolve()
    if magic != ctx.backend.fs_magic or mount not in real.parents:
        raise PinError(f"memory directory {directory} is not on the {ctx.backend.fs_name} mount {mount} "
                       f"(filesystem magic {magic:#x}); set memory_backing_dir = \"{mount}\" in qemu.conf", name)
    return directory


def _pin_one(ctx: HookContext, name: str, directory: Path, entry: Reservation, page_size: int,
             uid: int, gid: int, threads: int) -> Reservation:
    # pin brings ctypes, threading and mmap (3-4 ms at start-up): imported only by the operation that pins.
    from .pin import pin_file, remove_file

    stale = directory / entry.file
    users = _mappers(ctx, stale)
    if users is not None:
        if users:
            raise PinError(f"{stale} already exists and is mapped by pid {users[0]}", name)
        remove_file(directory, entry.file)
        log.event("stale-file-removed", name, path=stale)
        ctx.backend.released(stale)
    cpus = ctx.host.node_cpus(entry.node)
    if threads <= 0:
        threads = max(1, min(len(cpus) or 1, 8))
    result = pin_file(directory, entry.file, entry.bytes, entry.node, page_size=page_size, uid=uid,
                      gid=gid, threads=threads, cpus=cpus, fill=ctx.backend.fill())
    try:
        ctx.backend.allocated(name, result.path, entry.node, entry.bytes)
    except BaseException:
        remove_file(directory, entry.file)
        raise
    log.event("pinned", name, node=entry.node, bytes=entry.bytes, seconds=f"{result.seconds:.3f}",
              gib_per_s=f"{entry.bytes / (1 << 30) / max(result.seconds, 1e-9):.2f}")
    return replace(entry, state="pinned", path=str(result.path), inode=result.inode)


def _release_quietly(ctx: HookContext, name: str, uuid: str) -> None:
    try:
        with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
            mine = book.for_uuid(uuid)
            if mine:
                _drop(ctx, book, mine, "start-failed")
    except Exception as err:
        # The start already failed with its own message; release end will try again.
        log.warning(f"could not drop the reservation after a failed start: {err}", name)


def started(ctx: HookContext, name: str, dom: DomainMemory) -> None:
    """``started begin``: QEMU must map the very files we pinned; remember its pid."""
    if dom.metadata is None:
        return
    uuid = _uuid(dom, name)
    pid = runtime.read_pid(ctx.run_dir, name)
    if pid is None:
        raise DmemError(f"no QEMU pid file {ctx.run_dir / runtime.pid_file_names(name)[0]}", name)
    started_at = procmaps.start_ticks(ctx.proc, pid)
    # A transaction, not a lock-free read: a corrupt ledger is rebuilt (this guest's status file and
    # QEMU already exist) instead of failing started, which would make libvirt kill the guest.
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        mine = {e.file: e for e in book.for_uuid(uuid)}
        entries = []
        for placed in backing_files(dom):
            entry = mine.get(placed.file)
            if entry is None:
                where = "" if placed.node is None else f" on host node {placed.node}"
                raise DmemError(f"{placed.file}{where} was never pinned", name)
            entries.append(entry)
        verified = ctx.backend.verify(ctx, name, pid, entries)
        book.replace_uuid(uuid, [replace(e, pid=pid, pid_start=started_at) for e in verified])
    log.event("verified", name, pid=pid, files=len(mine))


def verify_files(ctx: HookContext, name: str, pid: int, entries: Sequence[Reservation]) -> list[Reservation]:
    """File-backed backends at ``started begin``: QEMU maps the very files that were pinned."""
    for entry in entries:
        _verify_mapped(ctx, name, pid, entry)
    return list(entries)


def _verify_mapped(ctx: HookContext, name: str, pid: int, entry: Reservation) -> None:
    # Without a pinned file QEMU created its own, which on dmemfs faults past its end (SIGBUS).
    if entry.state != "pinned" or not entry.path:
        raise DmemError(f"{entry.file} on host node {entry.node} was never pinned", name)
    try:
        info = os.stat(entry.path, follow_symlinks=False)
    except FileNotFoundError:
        raise DmemError(f"pinned file {entry.path} has disappeared", name) from None
    if info.st_ino != entry.inode or info.st_size != entry.bytes:
        raise DmemError(
            f"{entry.path} is not the file that was pinned (inode {info.st_ino}, "
            f"{format_size(info.st_size)}; pinned inode {entry.inode}, {format_size(entry.bytes)})", name)
    mapped = procmaps.maps_inode(ctx.proc, pid, info.st_dev, info.st_ino)
    if mapped < entry.bytes:
        raise DmemError(f"QEMU (pid {pid}) maps {format_size(mapped)} of {entry.path}, "
                        f"expected {format_size(entry.bytes)}", name)
    _verify_bound(ctx, name, pid, Path(os.path.realpath(entry.path)), entry.node)


def _verify_bound(ctx: HookContext, name: str, pid: int, path: Path, node: int) -> None:
    # Pages come from the node of the mapping's policy at fault time: QEMU's mapping must be strictly
    # bound to the node admission booked, or a later fault (after a balloon, a hot-unplug) lands elsewhere.
    policies = procmaps.numa_policies(ctx.proc, pid, path)
    if policies is None:
        return  # a kernel without NUMA support has no numa_maps: there is nothing to bind to
    wrong = [policy for policy in policies if policy != f"bind:{node}"] or ([] if policies else ["none"])
    if wrong:
        raise DmemError(f"QEMU (pid {pid}) maps {path} with NUMA policy {wrong[0]}, not bound to host node "
                        f"{node}; check <numatune><memnode mode='strict'> of this guest", name)


def release(ctx: HookContext, name: str, dom: DomainMemory) -> None:
    """``stopped end`` / ``release end``: unpin; idempotent, bounded by the lock timeout."""
    if not dom.uuid:
        return
    if dom.metadata is None and not any(e.uuid == dom.uuid for e in ctx.ledger.read()):
        # A file-backed guest that is not ours: take the host lock only if it somehow holds pages.
        return
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        mine = book.for_uuid(dom.uuid)
        if mine:
            _drop(ctx, book, mine, "unpin")


def reconnect(ctx: HookContext, name: str, dom: DomainMemory, dom_id: str | None) -> None:
    """``reconnect begin``: re-adopt a running guest's reservations, rebuilding them if lost."""
    if dom.metadata is None or not dom.uuid:
        return
    try:
        pid = runtime.read_pid(ctx.run_dir, name)
    except DmemError as err:
        # Re-adopting without a pid beats failing: libvirt kills a guest whose reconnect hook fails.
        log.warning(f"reconnect without a pid: {err.message}", name)
        pid = None
    started_at = procmaps.start_ticks(ctx.proc, pid) if pid else None
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        mine = book.for_uuid(dom.uuid)
        if mine:
            # An entry still "reserved" while the guest runs lost its pin to a crash between
            # pinning and recording it: the file on the mount tells what was pinned.
            on_mount = {e.file: e for e in _found_on_mount(ctx, name, dom, pid, "reconnect", dom_id)}
            readopted = []
            for entry in mine:
                seen = on_mount.get(entry.file)
                if entry.state != "pinned" and seen is not None and seen.state == "pinned":
                    entry = replace(entry, state="pinned", path=seen.path, inode=seen.inode)
                readopted.append(replace(entry, pid=pid or entry.pid,
                                         pid_start=started_at if pid else entry.pid_start))
            book.replace_uuid(dom.uuid, readopted)
            log.event("readopt", name, pid=pid, files=len(mine))
        else:
            found = _found_on_mount(ctx, name, dom, pid, "reconnect", dom_id)
            for entry in found:
                book.add(entry)
            _log_reservations("adopt", found, pid=pid)
        collect_orphans(ctx, book, keep_uuid=dom.uuid)


def incoming(ctx: HookContext, name: str, xml: bytes, origin: str) -> bytes | None:
    """``migrate begin`` / ``restore begin``: place on this host; return the changed XML or None.

    Nothing is booked here: libvirt may still turn the guest away after this hook without running any
    other (a domain of that name defined here with another UUID, measured), and a reservation made now
    would outlive it.  ``prepare begin`` follows at once and books this placement under the lock, or
    refuses if another guest took the room in between.
    """
    from .domxml import parse, retarget, serialize

    tree = parse(xml)
    dom = read_domain(tree.getroot())
    if dom.metadata is None:
        return None
    uuid = _uuid(dom, name)
    page_size = check_metadata(ctx, name, dom.metadata, arriving=origin)
    current = _recorded_placement(dom)
    refused: DmemError | None = None
    with ctx.ledger.transaction(rebuild=ctx.rebuild) as book:
        collect_orphans(ctx, book, keep_uuid=uuid)
        try:
            try:
                placement = _admit(ctx, book, name, uuid, dom, page_size, fixed=current)
            except PlacementError:
                placement = _admit(ctx, book, name, uuid, dom, page_size, fixed=None)
        except DmemError as err:
            refused = err  # committed with the orphans it freed, as in prepare
    if refused is not None:
        raise refused
    log.event(origin, name, placement=placement)
    return serialize(tree) if retarget(tree, placement) else None
