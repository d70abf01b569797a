"""The backend seam: where guest RAM files live and how many pages each host node has.

`open_backend(config)` picks the implementation the configuration names.  Every backend answers the
same questions (page size, per-node pools, which filesystem its files are on) and is told when the
hook has allocated or freed pages, so capacity bookkeeping that the kernel does for a real backend
can be done by the emulation without any special case in the hook.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..host import DmemPool, Host


class Backend(Protocol):
    """What the hook and the CLI need from a reserved-memory backend."""

    name: str
    mount: Path
    fs_magic: int
    fs_name: str

    def page_size(self) -> int:
        """Bytes per page of this backend's pool."""

    def pools(self) -> dict[int, DmemPool]:
        """Per host node: total and free bytes, as the kernel (or the emulation) reports them."""

    def fill(self) -> Callable[[int, int], None] | None:
        """What freshly allocated pages hold before the hook zeroes them (None: whatever the kernel left)."""

    def allocated(self, domain: str, node: int, size: int) -> None:
        """The hook is about to fault ``size`` bytes on ``node``; raises PinError if the pool cannot."""

    def released(self, node: int, size: int) -> None:
        """``size`` bytes on ``node`` were given back (their file is gone)."""


def open_backend(config: Config, host: Host | None = None) -> Backend:
    """The backend the configuration selects: emulated dmemfs when ``[dmemfs] emulate``, else dmemfs."""
    from ..host import Host
    from .dmemfs import DmemfsBackend

    host = host or Host(config)
    if config.dmemfs.emulate:
        from .emulated import EmulatedDmemfsBackend

        return EmulatedDmemfsBackend(config, host)
    return DmemfsBackend(config, host)
