"""Fake hosts for tests: sysfs NUMA nodes, dmem debugfs, boot_id, qemu.conf and a Config pointing at them.

`make_host(root, nodes, ...)` writes a tree under ``root`` in the kernel's own file formats and returns
the Config (loaded from ``root/config.toml``, as the CLI would).  `load_static_host(name, tmp_path)`
copies one of the hand-written trees under tests/data/hosts/ and does the same.  Helpers change the
counters afterwards, as the kernel would while guests start and stop.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dmem_libvirt import config as config_module
from dmem_libvirt.config import Config
from dmem_libvirt.units import GiB

STATIC_HOSTS = Path(__file__).parent / "data" / "hosts"
ROOT_PLACEHOLDER = "@ROOT@"
# Layout of a fake root, relative paths; the same in make_host and in the static trees.
SYSFS = "sys"
PROC = "proc"
DEBUGFS = "debug/dmem"
MOUNT = "dmem"
QEMU_CONF = "etc/libvirt/qemu.conf"
HOOKS_DIR = "etc/libvirt/hooks"
RUN_DIR = "run/libvirt/qemu"
STATE_DIR = "var/lib/dmem-libvirt"
EMPTY_DIRS = (MOUNT, HOOKS_DIR, RUN_DIR, STATE_DIR)


@dataclass(frozen=True)
class FakeNode:
    """One host NUMA node.  Sizes in bytes; ``dmem_total=None``: no dmem on this node."""

    cpus: str | Iterable[int] = "0-1"
    mem_total: int = 16 * GiB
    mem_free: int | None = None
    dmem_total: int | None = 8 * GiB
    dmem_free: int | None = None


NodeSpec = Mapping[int, FakeNode] | int | Iterable[FakeNode]


def make_host(
    root: Path,
    nodes: NodeSpec = 1,
    *,
    page_shift: int | None = 21,
    debugfs: bool = True,
    capacity: Mapping[int, int] | None = None,
    qemu_conf: str | None = None,
    page_size: int | None = None,
    distances: Mapping[int, Iterable[int]] | None = None,
    emulate: bool = False,
    memory_backing_dir: Path | None = None,
    boot_id: str | None = None,
) -> Config:
    """Write a fake host under ``root`` and return the Config for it.

    ``nodes``: a mapping node -> FakeNode, a count of default nodes (two CPUs each), or a sequence
    numbered from 0.  ``page_shift=None`` writes dpage_shift as 0 and all counts as 0, as the kernel
    shows them before dmemfs is first mounted.  ``qemu_conf`` is written verbatim (default: one that
    points memory_backing_dir at the dmemfs mount); ``page_size`` and ``capacity`` go to [dmemfs].
    """
    root = Path(root)
    spec = _node_spec(nodes)
    online = sorted(spec)
    node_dir = root / SYSFS / "devices" / "system" / "node"
    _write(node_dir / "online", _cpulist(online))
    _write(node_dir / "possible", _cpulist(online))
    for n in online:
        node = spec[n]
        row = list(distances[n]) if distances and n in distances else [
            10 if other == n else 20 for other in online]
        assert len(row) == len(online), f"distance row of node {n} needs {len(online)} entries"
        _write(node_dir / f"node{n}" / "cpulist", _cpulist(_cpus(node.cpus)))
        _write(node_dir / f"node{n}" / "distance", " ".join(str(d) for d in row) + "\n")
        _write(node_dir / f"node{n}" / "meminfo", meminfo(n, node.mem_total, _mem_free(node)))
    if debugfs:
        _write_debugfs(root / DEBUGFS, spec, page_shift)
    _write(root / PROC / "sys" / "kernel" / "random" / "boot_id", (boot_id or str(uuid.uuid4())) + "\n")
    if qemu_conf is None:
        qemu_conf = ("# memory_backing_dir = \"/var/lib/libvirt/qemu/ram\"\n"
                     f"memory_backing_dir = \"{root / MOUNT}\"\n")
    _write(root / QEMU_CONF, qemu_conf)
    for directory in EMPTY_DIRS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    toml = config_toml(str(root), page_size=page_size, capacity=capacity, emulate=emulate,
                       memory_backing_dir=memory_backing_dir)
    _write(root / "config.toml", toml)
    return config_module.load(root / "config.toml")


def config_toml(
    root: str,
    *,
    page_size: int | None = None,
    capacity: Mapping[int, int] | None = None,
    emulate: bool = False,
    memory_backing_dir: Path | None = None,
) -> str:
    """The config.toml text for a fake root laid out as make_host lays it out."""
    lines = [
        "[host]",
        f'sysfs = "{root}/{SYSFS}"',
        f'proc = "{root}/{PROC}"',
        "",
        "[dmemfs]",
        f'mount = "{root}/{MOUNT}"',
        f'debugfs = "{root}/{DEBUGFS}"',
    ]
    if page_size is not None:
        lines.append(f"page_size = {page_size}")
    if emulate:
        lines.append("emulate = true")
    lines += [
        "",
        "[libvirt]",
        f'qemu_conf = "{root}/{QEMU_CONF}"',
        f'run_dir = "{root}/{RUN_DIR}"',
        f'hooks_dir = "{root}/{HOOKS_DIR}"',
    ]
    if memory_backing_dir is not None:
        lines.append(f'memory_backing_dir = "{memory_backing_dir}"')
    lines += ["", "[state]", f'dir = "{root}/{STATE_DIR}"']
    if capacity:
        lines += ["", "[dmemfs.capacity]"] + [f"{node} = {size}" for node, size in sorted(capacity.items())]
    return "\n".join(lines) + "\n"


def load_static_host(name: str, tmp_path: Path) -> Config:
    """Copy tests/data/hosts/<name> into ``tmp_path/name`` and return its Config with absolute paths."""
    source = STATIC_HOSTS / name
    if not source.is_dir():
        raise FileNotFoundError(f"no static host {name!r} in {STATIC_HOSTS}")
    root = Path(tmp_path) / name
    shutil.copytree(source, root)
    # Placeholders stand for the root in every file that names a path (config.toml, qemu.conf).
    for path in root.rglob("*"):
        if path.is_file() and ROOT_PLACEHOLDER in (text := path.read_text()):
            path.write_text(text.replace(ROOT_PLACEHOLDER, str(root)))
    for directory in EMPTY_DIRS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    return config_module.load(root / "config.toml")


def static_host_names() -> list[str]:
    return sorted(path.name for path in STATIC_HOSTS.iterdir() if path.is_dir())


# ---- changing a fake host ----------------------------------------------------------------------


def set_free(config: Config, node: int, pages: int) -> None:
    """Set node<N>/free_dpages and keep the global free_dpages the sum of the nodes."""
    debugfs = config.dmemfs.debugfs
    _write(debugfs / f"node{node}" / "free_dpages", f"{pages}\n")
    _resum(debugfs, "free_dpages")


def set_total(config: Config, node: int, pages: int) -> None:
    """Set node<N>/total_dpages (creating the node's dmem directory) and the global total."""
    debugfs = config.dmemfs.debugfs
    _write(debugfs / f"node{node}" / "total_dpages", f"{pages}\n")
    if not (debugfs / f"node{node}" / "free_dpages").exists():
        _write(debugfs / f"node{node}" / "free_dpages", f"{pages}\n")
    _resum(debugfs, "total_dpages")
    _resum(debugfs, "free_dpages")


def free_pages(config: Config, node: int) -> int:
    return int((config.dmemfs.debugfs / f"node{node}" / "free_dpages").read_text())


def write_debugfs(config: Config, name: str, text: str) -> Path:
    """Write raw text into a debugfs file (e.g. "node1/free_dpages"), for malformed-input tests."""
    path = config.dmemfs.debugfs / name
    _write(path, text)
    return path


def write_sysfs(config: Config, name: str, text: str) -> Path:
    """Write raw text into <sysfs>/devices/system/node/<name> (e.g. "node0/cpulist")."""
    path = config.host.sysfs / "devices" / "system" / "node" / name
    _write(path, text)
    return path


def meminfo(node: int, total: int, free: int) -> str:
    """A nodeN/meminfo in the kernel's layout (sizes in bytes, printed in kB)."""
    used = total - free
    rows = [("MemTotal", total // 1024), ("MemFree", free // 1024), ("MemUsed", used // 1024),
            ("SwapCached", 0), ("Active", used // 4096), ("Inactive", used // 8192),
            ("Dirty", 0), ("FilePages", used // 2048), ("Shmem", 0), ("KernelStack", 8192),
            ("PageTables", 2048)]
    lines = [f"Node {node} {key + ':':<15} {value:>8} kB" for key, value in rows]
    lines += [f"Node {node} HugePages_Total:     0", f"Node {node} HugePages_Free:      0",
              f"Node {node} HugePages_Surp:      0"]
    return "\n".join(lines) + "\n"


# ---- internals -----------------------------------------------------------------------------------


def _node_spec(nodes: NodeSpec) -> dict[int, FakeNode]:
    if isinstance(nodes, int):
        return {n: FakeNode(cpus=[2 * n, 2 * n + 1]) for n in range(nodes)}
    if isinstance(nodes, Mapping):
        return dict(nodes)
    return dict(enumerate(nodes))


def _write_debugfs(debugfs: Path, spec: Mapping[int, FakeNode], page_shift: int | None) -> None:
    page = 1 << (page_shift or 21)
    for n, node in sorted(spec.items()):
        if node.dmem_total is None:
            continue
        total = node.dmem_total
        free = total if node.dmem_free is None else node.dmem_free
        assert total % page == 0 and free % page == 0, f"node {n}: dmem sizes must be whole pages"
        # Before the first mount the kernel reports 0 for every count.
        total_pages, free_pages_ = (total // page, free // page) if page_shift is not None else (0, 0)
        _write(debugfs / f"node{n}" / "total_dpages", f"{total_pages}\n")
        _write(debugfs / f"node{n}" / "free_dpages", f"{free_pages_}\n")
    _write(debugfs / "dpage_shift", f"{page_shift or 0}\n")
    _resum(debugfs, "total_dpages")
    _resum(debugfs, "free_dpages")
    regions = sum(1 for node in spec.values() if node.dmem_total)
    _write(debugfs / "region_num", f"{regions}\n")
    registered = sum(node.dmem_total or 0 for node in spec.values()) // 4096
    _write(debugfs / "registered_pages", f"{registered if page_shift is not None else 0}\n")
    _write(debugfs / "unaligned_pages", "0\n")


def _resum(debugfs: Path, name: str) -> None:
    total = sum(int(path.read_text()) for path in sorted(debugfs.glob(f"node*/{name}")))
    _write(debugfs / name, f"{total}\n")


def _mem_free(node: FakeNode) -> int:
    return node.mem_free if node.mem_free is not None else node.mem_total * 3 // 4


def _cpus(cpus: str | Iterable[int]) -> list[int]:
    if isinstance(cpus, str):
        from dmem_libvirt.cpulist import parse_cpulist

        return sorted(parse_cpulist(cpus))
    return sorted(cpus)


def _cpulist(numbers: Iterable[int]) -> str:
    """The kernel's compact list format: "0-3,8,10-11" and a newline ("\\n" when empty)."""
    ranges: list[str] = []
    run: list[int] = []
    for n in sorted(numbers):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            ranges.append(_range(run))
        run = [n]
    if run:
        ranges.append(_range(run))
    return ",".join(ranges) + "\n"


def _range(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
