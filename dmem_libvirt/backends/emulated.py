"""Emulated dmemfs for hosts whose kernel has none: a tmpfs for the files, a directory for debugfs.

Selected by ``[backend] name = "emulated"`` (or the older ``[dmemfs] emulate = true``); guests are defined
for "dmemfs", so a domain enabled on the emulation is enabled for the real thing.  Its counters live in
``[dmemfs] debugfs`` when that names one (the sandbox's), else in ``<state dir>/emulated-dmem``, created
and resized to ``[dmemfs.capacity]`` (default DEFAULT_CAPACITY per online node) in ``[dmemfs] page_size``
pages (default 2 MiB).  It keeps the dmemfs behaviours the product depends on:
- capacity and free counts are read from a debugfs-shaped tree (``dpage_shift``, ``node<N>/total_dpages``,
  ``node<N>/free_dpages``, same format as the kernel's); as the kernel does, pages are counted per file
  (in ``.files.json`` beside the counters): taken when the hook has pinned a file, back once the file is
  gone, whoever removed it, so a hook killed half-way leaves no page lost or counted twice;
- a node without enough free pages refuses the allocation, as dmemfs would (there with SIGBUS);
- freshly allocated pages are NOT zeroed: they are filled with DIRTY_PATTERN, standing for the previous
  tenant's data, so a pin that forgets to zero is caught by anyone scanning the file.
It does not emulate dmemfs's missing llseek/read/write, nor its statfs magic: files live on tmpfs.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_atomically
from ..config import EMULATED_COUNTERS
from ..errors import HostError, PinError
from ..units import GiB, MiB, format_page_size, format_size
from .dmemfs import DmemfsBackend

if TYPE_CHECKING:
    from ..config import Config
    from ..host import Host
    from . import Pool

TMPFS_MAGIC = 0x01021994
# Without a debugfs-shaped directory nor [dmemfs.capacity]: this much per online host node, in 2 MiB pages.
DEFAULT_CAPACITY = 1 * GiB
DEFAULT_PAGE_SIZE = 2 * MiB
BASE_PAGE = 4096
DIRTY_PATTERN = b"DMEM-DIRTY-PAGE!"
# Beside the counters: which files hold how many pages on which node, and what others took before.
ACCOUNTS = ".files.json"


class EmulatedDmemfsBackend(DmemfsBackend):
    """dmemfs's pools and page size, read the same way; the page accounting the kernel would do, done here."""

    label = "dmemfs (emulated)"
    fs_magic = TMPFS_MAGIC
    fs_name = "tmpfs (emulated dmemfs)"

    def mount_command(self) -> str:
        # Small pages, not huge=always: in a VM that hands freed memory back to its hypervisor (free page
        # reporting), each 2 MiB page is faulted in again from the host, and pinning 256 MiB took 250-480 ms
        # instead of 110-180 ms, varying from start to start (measured, bench/e2e_cycle.py).
        return f"mkdir -p {self.mount} && mount -t tmpfs none {self.mount}"

    def __init__(self, config: Config, host: Host) -> None:
        super().__init__(config, host)
        if self.debugfs == config.state.dir / EMULATED_COUNTERS:
            self._size_counters()

    def _size_counters(self) -> None:
        """Create or resize the counters beside the ledger to [dmemfs.capacity] (or DEFAULT_CAPACITY per node)."""
        page = self.config.dmemfs.page_size or DEFAULT_PAGE_SIZE
        capacity = self.config.dmemfs.capacity or dict.fromkeys(self.host.online_nodes(), DEFAULT_CAPACITY)
        try:
            self.debugfs.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self._counters():
                new = not (self.debugfs / "dpage_shift").exists()
                if new:
                    self._write("dpage_shift", page.bit_length() - 1)
                    self._write("unaligned_pages", 0)
                resized = {node: size // page for node, size in capacity.items()
                           if self._read_or_zero(f"node{node}/total_dpages") != size // page}
                if not (new or resized):
                    return
                # Settled on the totals as they were, so pinned pages stay taken whatever the capacity.
                accounts = self._settled()
                for node, pages in resized.items():
                    if node not in accounts.shown:
                        (self.debugfs / f"node{node}").mkdir(mode=0o700, exist_ok=True)
                        self._write(f"node{node}/free_dpages", pages)
                        accounts.others[node] = 0
                        accounts.shown[node] = (pages, pages)
                    self._write(f"node{node}/total_dpages", pages)
                self._commit(accounts)
                nodes = self._debugfs_nodes()
                totals = sum(self._read(f"node{n}/total_dpages") for n in nodes)
                self._write("total_dpages", totals)
                self._write("region_num", len(nodes))
                self._write("registered_pages", totals * page // BASE_PAGE)
        except OSError as err:
            raise HostError(f"cannot set up the emulated dmem counters in {self.debugfs}: {err.strerror}") from None

    def _read_or_zero(self, name: str) -> int:
        return self._read(name) if (self.debugfs / name).exists() else 0

    def fill(self) -> Callable[[int, int], None] | None:
        from ..pin import fill_pattern

        return fill_pattern(DIRTY_PATTERN)

    def allocated(self, domain: str, path: Path, node: int, size: int) -> None:
        """Count the pages of ``path``, just pinned on ``node``; PinError (and nothing counted) if short."""
        pages = -(-size // self.page_size())
        with self._counters():
            accounts = self._settled()
            accounts.files.pop(str(path), None)
            free = accounts.free(node, self._read(f"node{node}/total_dpages"))
            if free < pages:
                self._commit(accounts)
                raise PinError(
                    f"host node {node} has {format_size(free * self.page_size())} of "
                    f"{format_page_size(self.page_size())} dmem pages free, pinning needs {format_size(size)}",
                    domain,
                )
            accounts.files[str(path)] = FileAccount(node, pages, os.lstat(path).st_ino)
            self._commit(accounts)

    def released(self, path: Path) -> None:
        with self._counters():
            accounts = self._settled()
            accounts.files.pop(str(path), None)
            self._commit(accounts)

    def _debugfs_pools(self) -> dict[int, Pool]:
        # The kernel frees a file's pages when the file goes, whoever removed it: settle before reading.
        if os.access(self.debugfs, os.W_OK):
            with self._counters():
                self._commit(self._settled())
        return super()._debugfs_pools()

    def _settled(self) -> Accounts:
        """The accounts, less the files that are gone, after what others did to the counters since."""
        accounts = Accounts.load(self.debugfs / ACCOUNTS)
        for name, account in list(accounts.files.items()):
            try:
                alive = os.lstat(name).st_ino == account.inode
            except FileNotFoundError:
                alive = False
            if not alive:
                del accounts.files[name]
        for node in self._debugfs_nodes():
            free = self._read(f"node{node}/free_dpages")
            # Still ``before``: a process was killed between writing the accounts and the counters.
            if free not in accounts.shown.get(node, ()):
                # First seen, or written by someone else (the kernel this stands for: a pool that shrank
                # or grew): what the counters show taken, beyond our files, is others'.
                accounts.others[node] = (self._read(f"node{node}/total_dpages") - free
                                         - accounts.pages_on(node))
            accounts.shown[node] = (free, free)
        return accounts

    def _commit(self, accounts: Accounts) -> None:
        """The accounts first (one atomic replace, with what the counters show and will show), then the counters."""
        totals = {node: self._read(f"node{node}/total_dpages") for node in accounts.shown}
        for node, (before, _) in accounts.shown.items():
            accounts.shown[node] = (before, max(0, min(totals[node], accounts.free(node, totals[node]))))
        path = self.debugfs / ACCOUNTS
        data = accounts.encode()
        if data != (path.read_bytes() if path.exists() else b""):
            write_atomically(path, data, sync=False)
        for node, (before, after) in accounts.shown.items():
            if before != after:
                self._write(f"node{node}/free_dpages", after)
        total_free = sum(after for _, after in accounts.shown.values())
        if self._read_or_zero("free_dpages") != total_free:
            self._write("free_dpages", total_free)

    def _counters(self) -> _CounterLock:
        return _CounterLock(self.debugfs / ".lock")

    def _read(self, name: str) -> int:
        path = self.debugfs / name
        try:
            text = path.read_text()
        except OSError as err:
            raise HostError(f"cannot read emulated debugfs counter {path}: {err.strerror}") from None
        if not text.strip().isdigit():
            raise HostError(f"cannot parse {path}: {text!r} is not a decimal number")
        return int(text)

    def _write(self, name: str, value: int) -> None:
        path = self.debugfs / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(f"{value}\n")
        os.replace(tmp, path)


class FileAccount:
    """The pages one pinned file holds, and the inode they belong to (a file recreated there is another)."""

    __slots__ = ("inode", "node", "pages")

    def __init__(self, node: int, pages: int, inode: int) -> None:
        self.node, self.pages, self.inode = node, pages, inode


class Accounts:
    """Pages per pinned file, and per node the pages taken before the emulation first counted (others').

    The free count of a node is its total less both: whatever a killed process left half-done, the next
    settle gives back exactly the pages of the files that are gone.
    """

    def __init__(self, others: dict[int, int], files: dict[str, FileAccount],
                 shown: dict[int, tuple[int, int]]) -> None:
        self.others, self.files = others, files
        # Per node, the free count the counters showed before the last commit and the one it wrote.
        self.shown = shown

    @classmethod
    def load(cls, path: Path) -> Accounts:
        try:
            document = json.loads(path.read_bytes())
            return cls({int(node): int(pages) for node, pages in document["others"].items()},
                       {str(name): FileAccount(int(node), int(pages), int(inode))
                        for name, (node, pages, inode) in document["files"].items()},
                       {int(node): (int(before), int(after)) for node, (before, after) in document["shown"].items()})
        except FileNotFoundError:
            return cls({}, {}, {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            # Never a reason to block a guest: counting afresh leaves every page taken now taken (as others').
            from .. import log

            log.warning(f"emulated dmem accounts {path} unreadable ({err}): counting afresh")
            return cls({}, {}, {})

    def pages_on(self, node: int) -> int:
        return sum(account.pages for account in self.files.values() if account.node == node)

    def free(self, node: int, total: int) -> int:
        return total - self.others.get(node, 0) - self.pages_on(node)

    def encode(self) -> bytes:
        return json.dumps({
            "others": {str(node): pages for node, pages in sorted(self.others.items())},
            "files": {name: [a.node, a.pages, a.inode] for name, a in sorted(self.files.items())},
            "shown": {str(node): list(pair) for node, pair in sorted(self.shown.items())},
        }).encode()


class _CounterLock:
    """flock on a file beside the counters: several hooks may pin at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _CounterLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)
