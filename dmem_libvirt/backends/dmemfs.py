"""dmemfs, as the RFC kernel provides it: capacity from debugfs, pages freed by the kernel on unlink.

The kernel does all page accounting, so `allocated`/`released` only log; an exhausted node shows up
as a populate failure while pinning (MADV_POPULATE_WRITE reports what would otherwise be a SIGBUS).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..host import DMEMFS_MAGIC

if TYPE_CHECKING:
    from ..config import Config
    from ..host import DmemPool, Host


class DmemfsBackend:
    name = "dmemfs"
    fs_magic = DMEMFS_MAGIC
    fs_name = "dmemfs"

    def __init__(self, config: Config, host: Host) -> None:
        self.config = config
        self.host = host
        self.mount = config.dmemfs.mount

    def page_size(self) -> int:
        return self.host.dmem_page_size()

    def pools(self) -> dict[int, DmemPool]:
        return self.host.dmem_pools()

    def fill(self) -> Callable[[int, int], None] | None:
        return None

    def allocated(self, domain: str, node: int, size: int) -> None:
        return None

    def released(self, node: int, size: int) -> None:
        return None
