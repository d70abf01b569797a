"""Generic host reading: NUMA nodes from sysfs, the boot id, libvirt's qemu.conf, statfs.

What a backend's kernel interface exposes (dmem debugfs, hugetlbfs pools) is read by that backend, with
the strict readers here (`read_text`, `read_decimal`).  Every path comes from the Config; nothing is read
until a method asks for it, and nothing is cached that can change.  A missing or malformed file raises
HostError with one line quoting the file and the offending text.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeAlias, TypeVar

from .config import Config
from .errors import HostError
from .units import KiB

# libvirt's built-in default when qemu.conf leaves memory_backing_dir unset (src/qemu/qemu_conf.c).
DEFAULT_MEMORY_BACKING_DIR = Path("/var/lib/libvirt/qemu/ram")

_DECIMAL = re.compile(r"[0-9]+\n?")
_BOOT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_T = TypeVar("_T")


def parse_cpulist(text: str) -> frozenset[int]:
    """CPUs (or nodes) from the kernel's list format "0-3,8,10-11"; "" is empty.

    Also takes libvirt's cpuset exclusions ("0-7,^3"), applied left to right as libvirt does.
    Raises ValueError quoting the text.
    """
    body = text.strip()
    if not body:
        return frozenset()
    cpus: set[int] = set()
    for item in body.split(","):
        part = item.strip()
        try:
            if part.startswith("^"):
                cpus.discard(_cpu_number(part[1:]))
            elif "-" in part:
                low_text, high_text = part.split("-", 1)
                low, high = _cpu_number(low_text), _cpu_number(high_text)
                if low > high:
                    raise ValueError(f"range {part!r} runs backwards")
                cpus.update(range(low, high + 1))
            else:
                cpus.add(_cpu_number(part))
        except ValueError as err:
            raise ValueError(f"not a CPU list: {text!r} ({err})") from None
    return frozenset(cpus)


def _cpu_number(text: str) -> int:
    stripped = text.strip()
    if not stripped.isascii() or not stripped.isdigit():
        raise ValueError(f"{text!r} is not a CPU number")
    return int(stripped)


def fs_magic(path: Path | str) -> int:
    """The filesystem magic (statfs f_type) of the filesystem holding ``path``; raises OSError."""
    return statfs(path)[0]


@dataclass(frozen=True)
class NodeInfo:
    node: int
    cpus: frozenset[int]
    # One entry per online node, in the order of the online list (the kernel prints for_each_online_node).
    distances: tuple[int, ...]
    mem_total: int
    mem_free: int


class Host:
    """Reads the host's NUMA topology and libvirt's configuration through the paths of one Config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._node_dir = config.host.sysfs / "devices" / "system" / "node"

    # ---- NUMA topology ---------------------------------------------------------------------------

    def online_nodes(self) -> list[int]:
        path = self._node_dir / "online"
        return sorted(_parse(path, read_text(path), parse_cpulist))

    def node(self, n: int) -> NodeInfo:
        directory = self._node_dir / f"node{n}"
        if not directory.is_dir():
            raise HostError(f"host node {n} does not exist: no {directory} "
                            f"(online nodes: {_format_nodes(self.online_nodes())})")
        cpulist = directory / "cpulist"
        distance = directory / "distance"
        meminfo = directory / "meminfo"
        cpus = _parse(cpulist, read_text(cpulist), parse_cpulist)
        distances = _parse(distance, read_text(distance), _parse_distances)
        fields = _parse_meminfo(meminfo, read_text(meminfo), n)
        return NodeInfo(n, cpus, distances, fields["MemTotal"], fields["MemFree"])

    def nodes(self) -> list[NodeInfo]:
        return [self.node(n) for n in self.online_nodes()]

    def boot_id(self) -> str:
        path = self.config.host.proc / "sys" / "kernel" / "random" / "boot_id"
        text = read_text(path)
        value = text.strip()
        if not _BOOT_ID.fullmatch(value):
            raise HostError(f"cannot parse {path}: {text!r} is not a boot id (a UUID)")
        return value

    # ---- libvirt ---------------------------------------------------------------------------------

    def memory_backing_dir(self) -> Path:
        """Where libvirt puts file-backed guest RAM: the config override, else qemu.conf, else the default."""
        override = self.config.libvirt.memory_backing_dir
        if override is not None:
            return override
        value = self.qemu_conf_value("memory_backing_dir")
        if value is None:
            return DEFAULT_MEMORY_BACKING_DIR
        if not isinstance(value, str) or not value.startswith("/"):
            path = self.config.libvirt.qemu_conf
            raise HostError(f"cannot parse {path}: memory_backing_dir = {value!r} is not an absolute path")
        return Path(value)

    def qemu_conf_value(self, key: str) -> ConfValue | None:
        """The value of ``key`` in libvirt's qemu.conf; None when unset or when there is no qemu.conf."""
        path = self.config.libvirt.qemu_conf
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise HostError(f"cannot read {path}: {_reason(err)}") from None
        try:
            return _conf_value(text, key)
        except ValueError as err:
            raise HostError(f"cannot parse {path}: {err}") from None


# ---- file reading and parsing -------------------------------------------------------------------


def read_text(path: Path) -> str:
    """The text of a host file; HostError naming the file when it cannot be read."""
    try:
        return path.read_text()
    except FileNotFoundError:
        raise HostError(f"cannot read {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise HostError(f"cannot read {path}: {_reason(err)}") from None


def _reason(err: OSError | UnicodeDecodeError) -> str:
    if isinstance(err, UnicodeDecodeError):
        return "not UTF-8 text"
    return err.strerror or str(err)


def read_decimal(path: Path) -> int:
    """The one decimal number (and optional newline) a sysfs/debugfs/procfs counter holds."""
    text = read_text(path)
    if not _DECIMAL.fullmatch(text):
        raise HostError(f"cannot parse {path}: {text!r} is not a decimal number")
    return int(text)


def _parse(path: Path, text: str, parser: Callable[[str], _T]) -> _T:
    try:
        return parser(text)
    except ValueError as err:
        raise HostError(f"cannot parse {path}: {err}") from None


def _parse_distances(text: str) -> tuple[int, ...]:
    words = text.split()
    if not words or not all(w.isascii() and w.isdigit() for w in words):
        raise ValueError(f"{text!r} is not a row of node distances")
    return tuple(int(w) for w in words)


def _parse_meminfo(path: Path, text: str, node: int) -> dict[str, int]:
    """MemTotal/MemFree in bytes from lines like "Node 0 MemTotal:  16384 kB"."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 4 or words[0] != "Node" or words[2] not in ("MemTotal:", "MemFree:"):
            continue
        if words[1] != str(node) or len(words) != 5 or words[4] != "kB" or not words[3].isdigit():
            raise HostError(f"cannot parse {path}: {line!r} is not 'Node {node} {words[2]} <number> kB'")
        found[words[2].rstrip(":")] = int(words[3]) * KiB
    missing = [key for key in ("MemTotal", "MemFree") if key not in found]
    if missing:
        raise HostError(f"cannot parse {path}: no {' or '.join(missing)} line in {text[:80]!r}")
    return found


def _format_nodes(nodes: list[int]) -> str:
    return ",".join(str(n) for n in nodes) or "none"


# ---- libvirt's conf syntax (src/util/virconf.c) -------------------------------------------------
# name = value, value being a quoted string ('...', "...", """..."""), an integer or a [list] that may
# span lines; '#' starts a comment; statements end at a newline or ';'.  libvirt returns the first
# entry of a repeated name, so the first wins here too.

_CONF_TOKEN = (
    r'''(?P<space>[ \t\r]+)|(?P<comment>\#[^\n]*)|(?P<eol>[\n;])|(?P<name>[A-Za-z][A-Za-z0-9_]*)'''
    r'''|(?P<eq>=)|(?P<tstr>"""(?P<tval>.*?)""")|(?P<dstr>"(?P<dval>[^"\n]*)")|(?P<sstr>'(?P<sval>[^'\n]*)')'''
    r'''|(?P<num>[-+]?[0-9]+)|(?P<open>\[)|(?P<close>\])|(?P<comma>,)'''
)
_CONF_STRINGS = {"tstr": "tval", "dstr": "dval", "sstr": "sval"}

ConfValue: TypeAlias = "str | int | list[ConfValue]"


def _conf_value(text: str, key: str) -> ConfValue | None:
    """The value of ``key`` in a libvirt conf file, None when unset; ValueError on a syntax error."""
    tokens = _conf_tokens(text)
    position = 0
    found: ConfValue | None = None
    seen = False
    while position < len(tokens):
        kind, value, line = tokens[position]
        if kind == "eol":
            position += 1
            continue
        if kind != "name" or position + 1 >= len(tokens) or tokens[position + 1][0] != "eq":
            raise ValueError(f"line {line}: expected 'name = value', found {value!r}")
        parsed, position = _conf_parse_value(tokens, position + 2, line)
        if position < len(tokens) and tokens[position][0] != "eol":
            raise ValueError(f"line {tokens[position][2]}: unexpected {tokens[position][1]!r} after a value")
        if value == key and not seen:
            found, seen = parsed, True
    return found


def _conf_tokens(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    # Compiled here, not at import: only memory_backing_dir() needs it.
    pattern = re.compile(_CONF_TOKEN, re.DOTALL)
    position, line = 0, 1
    while position < len(text):
        match = pattern.match(text, position)
        if match is None:
            snippet = text[position:].split("\n", 1)[0]
            raise ValueError(f"line {line}: cannot read {snippet!r}")
        kind = match.lastgroup or ""
        raw = match.group(0)
        if kind in _CONF_STRINGS:
            tokens.append(("str", match.group(_CONF_STRINGS[kind]), line))
        elif kind not in ("space", "comment"):
            tokens.append((kind, raw, line))
        line += raw.count("\n")
        position = match.end()
    return tokens


def _conf_parse_value(tokens: list[tuple[str, str, int]], position: int, line: int) -> tuple[ConfValue, int]:
    if position >= len(tokens) or tokens[position][0] == "eol":
        raise ValueError(f"line {line}: expected a value after '='")
    kind, value, line = tokens[position]
    if kind == "str":
        return value, position + 1
    if kind == "num":
        return int(value), position + 1
    if kind != "open":
        raise ValueError(f"line {line}: expected a value, found {value!r}")
    items: list[ConfValue] = []
    position += 1
    expect_item = True
    while True:
        while position < len(tokens) and tokens[position][0] == "eol" and tokens[position][1] == "\n":
            position += 1
        if position >= len(tokens):
            raise ValueError(f"line {line}: list is not closed with ']'")
        kind, value, at = tokens[position]
        if kind == "close":
            return items, position + 1
        if expect_item:
            item, position = _conf_parse_value(tokens, position, at)
            items.append(item)
            expect_item = False
        elif kind == "comma":
            position += 1
            expect_item = True
        else:
            raise ValueError(f"line {at}: expected ',' or ']' in a list, found {value!r}")


# ---- statfs(2) ----------------------------------------------------------------------------------
# os.statvfs has no f_type, and only f_type tells dmemfs (and hugetlbfs) apart: call libc's statfs through ctypes,
# loaded on first use so that a caller that never asks for a magic number never pays for ctypes.


@functools.cache
def _libc_statfs() -> tuple[Any, type[Any]]:
    import ctypes

    class Statfs(ctypes.Structure):
        # struct statfs on 64-bit Linux (x86-64 is the only dmemfs architecture): __fsword_t is long.
        _fields_: ClassVar = [
            ("f_type", ctypes.c_long),
            ("f_bsize", ctypes.c_long),
            ("f_blocks", ctypes.c_ulong),
            ("f_bfree", ctypes.c_ulong),
            ("f_bavail", ctypes.c_ulong),
            ("f_files", ctypes.c_ulong),
            ("f_ffree", ctypes.c_ulong),
            ("f_fsid", ctypes.c_int * 2),
            ("f_namelen", ctypes.c_long),
            ("f_frsize", ctypes.c_long),
            ("f_flags", ctypes.c_long),
            ("f_spare", ctypes.c_long * 4),
        ]

    function = ctypes.CDLL(None, use_errno=True).statfs
    function.argtypes = [ctypes.c_char_p, ctypes.POINTER(Statfs)]
    function.restype = ctypes.c_int
    return function, Statfs


def statfs(path: Path | str) -> tuple[int, int]:
    """(f_type, f_bsize) of the filesystem holding ``path``; raises OSError."""
    import ctypes

    function, struct = _libc_statfs()
    buffer = struct()
    if function(os.fsencode(path), ctypes.byref(buffer)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    # Magic numbers are 32-bit; mask so one with the top bit set compares equal on any word size.
    return int(buffer.f_type) & 0xFFFFFFFF, int(buffer.f_bsize)
