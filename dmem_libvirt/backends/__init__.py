"""The backend seam: everything about one kernel interface for reserved guest memory.

A backend owns how its pools and page sizes are read, what a domain's define-time XML looks like, what
happens at each step of the guest lifecycle, its `check` findings and its `struct page` savings.  The
lifecycle (admission, the ledger, orphans) is generic and calls these methods at fixed points:

- define time: `page_size_for`, `unsupported`, `rooms` (then `domxml.rewrite(..., backend=name)`);
- ``prepare begin`` (under the host lock): `ready`, `rooms`, then `reserve` for the new entries, which may
  change the kernel's pools and must undo its own change before it raises;
- ``start begin``: `start`; ``started begin``: `verify`; running guests found again: `adopt`;
- ``release`` and every recovery path (under the host lock, after entries left the book): `give_back`,
  which never raises.

`open_backend(config)` picks the implementation ``[backend] name`` names (see config.backend_name).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..domain import DomainMemory
    from ..host import Host
    from ..ledger import Book, Reservation
    from ..lifecycle import HookContext
    from ..placement import NodeRoom


@dataclass(frozen=True)
class Pool:
    """One host node's pool of one page size: total and free bytes, as the kernel reports them."""

    node: int
    total: int
    free: int


# The name other modules knew it by when dmemfs was the only backend.
DmemPool = Pool


@dataclass(frozen=True)
class Finding:
    """One `check` result: what was found and, when it is a problem, the fix."""

    ok: bool
    what: str
    fix: str = ""


@dataclass(frozen=True)
class Savings:
    """`struct page` memory this backend saves; ``measured`` says whether a kernel counter shows it."""

    bytes: int
    measured: bool
    how: str


class Backend(Protocol):
    """What the lifecycle, the define-time command and the operating views need from a backend."""

    name: str      # recorded in each domain's metadata (the emulated dmemfs is "dmemfs")
    label: str     # for people: "dmemfs", "dmemfs (emulated)", "hugetlbfs"
    pages: str     # how refusals name its pages: "dmem" or "huge"
    fs_magic: int
    fs_name: str

    @property
    def mount(self) -> Path:
        """Where guest RAM files of the default page size live."""

    def page_size(self) -> int:
        """Bytes per page of this backend's default pool."""

    def page_sizes(self) -> tuple[int, ...]:
        """Every page size a guest may be defined with on this host."""

    def page_size_for(self, dom: DomainMemory) -> int:
        """The page size `enable` gives this domain (a hugetlbfs guest keeps its own when it can)."""

    def pools(self, page_size: int | None = None) -> dict[int, Pool]:
        """Per host node: total and free bytes of the pool of ``page_size`` (default: page_size())."""

    def unsupported(self, dom: DomainMemory, page_size: int) -> str | None:
        """The one-line reason this domain cannot be put on this backend, or None."""

    def rooms(self, held: Sequence[Reservation], page_size: int, *, except_uuid: str | None) -> list[NodeRoom]:
        """Each node's room for a new domain of ``page_size`` pages, given what the ledger holds."""

    def ready(self, ctx: HookContext, name: str) -> None:
        """``prepare begin``, before anything is booked: raise if the host cannot start a guest of ours."""

    def reserve(self, book: Book, name: str, entries: Sequence[Reservation]) -> None:
        """Make the pools hold ``entries`` (already in ``book``); raise, having undone any change, if not."""

    def start(self, ctx: HookContext, name: str, dom: DomainMemory, uuid: str, dom_id: str | None) -> None:
        """``start begin``: whatever must exist before QEMU maps guest RAM."""

    def verify(self, ctx: HookContext, name: str, pid: int, entries: Sequence[Reservation]) -> list[Reservation]:
        """``started begin``: check QEMU maps what was reserved; the entries as they now stand."""

    def adopt(self, ctx: HookContext, name: str, pid: int | None, dom_id: str | None,
              entries: Sequence[Reservation]) -> list[Reservation]:
        """Entries of a guest found running (reconnect, rebuild), marked as far as the host shows them."""

    def give_back(self, ctx: HookContext, book: Book, dropped: Sequence[Reservation]) -> None:
        """After ``dropped`` left ``book``: return to the kernel what this backend took; never raises."""

    def fill(self) -> Callable[[int, int], None] | None:
        """What freshly allocated pages hold before the hook zeroes them (None: whatever the kernel left)."""

    def allocated(self, domain: str, path: Path, node: int, size: int) -> None:
        """The hook pinned ``path``, ``size`` bytes on ``node``; raises PinError if the pool cannot hold it."""

    def released(self, path: Path) -> None:
        """The hook removed ``path``: its pages are back."""

    def check(self, ctx: HookContext) -> list[Finding]:
        """Every condition this backend needs on the host, each with its fix."""

    def savings(self) -> Savings:
        """`struct page` memory saved by this backend's pools."""


def open_backend(config: Config, host: Host | None = None) -> Backend:
    """The backend the configuration selects."""
    from ..host import Host

    host = host or Host(config)
    name = config.backend_name
    if name == "hugetlbfs":
        from .hugetlbfs import HugetlbfsBackend

        return HugetlbfsBackend(config, host)
    if name == "emulated":
        from .emulated import EmulatedDmemfsBackend

        return EmulatedDmemfsBackend(config, host)
    from .dmemfs import DmemfsBackend

    return DmemfsBackend(config, host)
