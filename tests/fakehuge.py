"""A fake hugetlbfs host: per-node pools in sysfs, mounts in /proc/mounts, qemu.conf, HVO, and a fake kernel.

`make_huge_host(root, ...)` extends tests/fakehost.make_host with the kernel's hugepage files and returns the
Config (``[backend] name = "hugetlbfs"``).  `FakeKernel` is the hugetlbfs backend with the kernel's side of a
pool write emulated: a node gives at most ``capacity`` pages (more after compaction when ``compactable``)
and never frees pages in use; it is what the kernel does to ``nr_hugepages``, written back into the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from fakehost import make_host

from dmem_libvirt import config as config_module
from dmem_libvirt.backends.hugetlbfs import HugetlbfsBackend
from dmem_libvirt.config import Config
from dmem_libvirt.host import Host
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import GiB, KiB, MiB

SIZES = (2 * MiB, GiB)


def _node_pool(config: Config, node: int, size: int) -> Path:
    return (config.host.sysfs / "devices" / "system" / "node" / f"node{node}" / "hugepages"
            / f"hugepages-{size // KiB}kB")


def _global_pool(config: Config, size: int) -> Path:
    return config.host.sysfs / "kernel" / "mm" / "hugepages" / f"hugepages-{size // KiB}kB"


def make_huge_host(root: Path, nodes: int = 2, *, pools: Mapping[tuple[int, int], tuple[int, int]] | None = None,
                   limit: Mapping[int, str] | None = None, mounted: Sequence[int] = SIZES,
                   listed: bool = True, hvo: str | None = "0", memmap: tuple[int, int] | None = None,
                   memory_blocks: int = 0) -> Config:
    """A host of ``nodes`` nodes; ``pools`` (node, page size) -> (nr, free), else empty pools.

    ``mounted``: page sizes with a hugetlbfs mount at <root>/hugepages-<size>; ``listed``: qemu.conf lists
    them in hugetlbfs_mount (else libvirt would find them in /proc/mounts).  ``hvo``: the sysctl's text
    (None: the kernel has none).  ``memmap``: /proc/vmstat (nr_memmap_pages, nr_memmap_boot_pages) with
    ``memory_blocks`` online memory blocks of 128 MiB.
    """
    mounts = {size: root / f"hugepages-{size // MiB}M" for size in mounted}
    listing = ", ".join(f'"{path}"' for path in mounts.values())
    qemu_conf = f"hugetlbfs_mount = [ {listing} ]\n" if listed and mounts else "# hugetlbfs_mount unset\n"
    config = make_host(root, nodes, qemu_conf=qemu_conf, debugfs=False)
    for size in SIZES:
        for node in range(nodes):
            nr, free = (pools or {}).get((node, size), (0, 0))
            _write_pool(config, node, size, nr, free)
        _resum(config, size, nodes)
        (_global_pool(config, size) / "resv_hugepages").write_text("0\n")
    lines = ["proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0"]
    for size, path in mounts.items():
        path.mkdir(parents=True, exist_ok=True)
        option = f"{size // GiB}G" if size >= GiB else f"{size // MiB}M"
        lines.append(f"hugetlbfs {path} hugetlbfs rw,relatime,pagesize={option} 0 0")
    proc = config.host.proc
    (proc / "mounts").write_text("\n".join(lines) + "\n")
    (proc / "sys" / "vm").mkdir(parents=True, exist_ok=True)
    if hvo is not None:
        (proc / "sys" / "vm" / "hugetlb_optimize_vmemmap").write_text(hvo + "\n")
    if memmap is not None:
        (proc / "vmstat").write_text(f"nr_free_pages 1000\nnr_memmap_pages {memmap[0]}\n"
                                     f"nr_memmap_boot_pages {memmap[1]}\nnr_foo 3\n")
        blocks = config.host.sysfs / "devices" / "system" / "memory"
        blocks.mkdir(parents=True, exist_ok=True)
        (blocks / "block_size_bytes").write_text("8000000\n")
        for index in range(memory_blocks):
            (blocks / f"memory{index}").mkdir()
            (blocks / f"memory{index}" / "state").write_text("online\n")
    text = (root / "config.toml").read_text() + '\n[backend]\nname = "hugetlbfs"\n'
    if limit:
        text += "\n[hugetlbfs.limit]\n" + "".join(f'{node} = "{size}"\n' for node, size in limit.items())
    (root / "config.toml").write_text(text)
    return config_module.load(root / "config.toml")


def _write_pool(config: Config, node: int, size: int, nr: int, free: int) -> None:
    directory = _node_pool(config, node, size)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nr_hugepages").write_text(f"{nr}\n")
    (directory / "free_hugepages").write_text(f"{free}\n")
    (directory / "surplus_hugepages").write_text("0\n")


def _resum(config: Config, size: int, nodes: int) -> None:
    directory = _global_pool(config, size)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("nr_hugepages", "free_hugepages"):
        total = sum(int((_node_pool(config, node, size) / name).read_text()) for node in range(nodes))
        (directory / name).write_text(f"{total}\n")


def pool(config: Config, node: int, size: int = 2 * MiB) -> tuple[int, int]:
    """(nr, free) of a node's pool, as the files say."""
    directory = _node_pool(config, node, size)
    return int((directory / "nr_hugepages").read_text()), int((directory / "free_hugepages").read_text())


def use(config: Config, node: int, pages: int, size: int = 2 * MiB) -> None:
    """A process faults ``pages`` (negative: frees them) of the node's pool."""
    nr, free = pool(config, node, size)
    assert 0 <= free - pages <= nr, f"node {node}: cannot use {pages} of {free} free pages"
    _write_pool(config, node, size, nr, free - pages)


def set_reserved(config: Config, pages: int, size: int = 2 * MiB) -> None:
    (_global_pool(config, size) / "resv_hugepages").write_text(f"{pages}\n")


class FakeKernel(HugetlbfsBackend):
    """The backend on a fake sysfs whose pool writes behave as the kernel's do."""

    def __init__(self, config: Config, host: Host, *, capacity: Mapping[int, int] | None = None,
                 compactable: Mapping[int, int] | None = None) -> None:
        super().__init__(config, host)
        self.capacity = dict(capacity or {})       # node -> most pages the node can hold
        self.compactable = dict(compactable or {})  # node -> pages compaction makes available
        self.compactions: list[int] = []
        self.writes: list[tuple[int, int, int]] = []

    def _set_pages(self, node: int, page_size: int, pages: int) -> int:
        self.writes.append((node, page_size, pages))
        nr, free = pool(self.config, node, page_size)
        used = nr - free
        most = self.capacity.get(node, 1 << 30)
        new = max(used, min(pages, most))
        _write_pool(self.config, node, page_size, new, new - used)
        return new

    def compact(self, node: int) -> None:
        self.compactions.append(node)
        self.capacity[node] = self.capacity.get(node, 1 << 30) + self.compactable.pop(node, 0)


def context(config: Config, **kernel: Mapping[int, int]) -> HookContext:
    """A hook context on the fake host whose backend is a FakeKernel."""
    ctx = HookContext.create(config)
    ctx.backend = FakeKernel(config, ctx.host, **kernel)
    return ctx
