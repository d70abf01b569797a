"""The TOML configuration: every host path the program touches, with production defaults.

Loaded from ``--config FILE``, else ``$DMEM_LIBVIRT_CONFIG``, else ``/etc/dmem-libvirt/config.toml``
(the hook reads only the default path: libvirt gives hooks no environment).  A missing default file
means all defaults.  ``[dmemfs] emulate = true`` without ``debugfs`` puts the emulated counters under
``<state dir>/emulated-dmem``.  Unknown sections or keys and ill-typed values raise ConfigError naming the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .units import parse_size

DEFAULT_PATH = Path("/etc/dmem-libvirt/config.toml")
ENV_VAR = "DMEM_LIBVIRT_CONFIG"
# With [dmemfs] emulate and no [dmemfs] debugfs: <state dir>/emulated-dmem holds the emulated counters.
EMULATED_COUNTERS = "emulated-dmem"


@dataclass(frozen=True)
class HostConfig:
    sysfs: Path = Path("/sys")
    proc: Path = Path("/proc")


@dataclass(frozen=True)
class DmemfsConfig:
    mount: Path = Path("/dev/dmem")
    debugfs: Path = Path("/sys/kernel/debug/dmem")
    page_size: int | None = None
    # node -> bytes, for hosts whose debugfs is absent
    capacity: dict[int, int] = field(default_factory=dict)
    emulate: bool = False


@dataclass(frozen=True)
class BackendConfig:
    # "" = not set: dmemfs, or emulated when the older [dmemfs] emulate = true says so.
    name: str = ""


@dataclass(frozen=True)
class HugetlbfsConfig:
    # None: libvirt's hugetlbfs_mount in qemu.conf, else the hugetlbfs mount in /proc/mounts.
    mount: Path | None = None
    # None: the page size of that mount.
    page_size: int | None = None
    # node -> bytes the tool may grow that node's pool to; a node without a limit is never grown.
    limit: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LibvirtConfig:
    qemu_conf: Path = Path("/etc/libvirt/qemu.conf")
    memory_backing_dir: Path | None = None
    run_dir: Path = Path("/run/libvirt/qemu")
    hooks_dir: Path = Path("/etc/libvirt/hooks")


@dataclass(frozen=True)
class StateConfig:
    dir: Path = Path("/var/lib/dmem-libvirt")
    lock_timeout: float = 10.0
    # Orphans younger than this are never collected: a start may be in flight.
    orphan_grace: float = 300.0


@dataclass(frozen=True)
class PinConfig:
    # 0 = one thread per CPU of the target node, at most 8.
    threads: int = 0


# Guests without our metadata, per kind: what the hook does today first, then "admit".
ADOPT_MODES = {"file_backed": ("refuse", "admit"), "hugepages": ("ignore", "admit")}


@dataclass(frozen=True)
class AdoptConfig:
    # File-backed guests without our metadata whose RAM lands on the backend (as OpenStack Nova defines
    # them): "refuse" them at prepare, or "admit" them through the same lifecycle as ours.
    file_backed: str = "refuse"
    # <hugepages> guests without our metadata (Nova's hw:mem_page_size) under the hugetlbfs backend:
    # "ignore" them (libvirt and QEMU alone find out whether the pool suffices), or "admit" them.
    hugepages: str = "ignore"


@dataclass(frozen=True)
class NovaConfig:
    # Pool memory kept out of what `nova-config` tells Nova, for guests defined outside Nova.
    reserve: int = 0


@dataclass(frozen=True)
class Config:
    host: HostConfig = field(default_factory=HostConfig)
    dmemfs: DmemfsConfig = field(default_factory=DmemfsConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    hugetlbfs: HugetlbfsConfig = field(default_factory=HugetlbfsConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    state: StateConfig = field(default_factory=StateConfig)
    pin: PinConfig = field(default_factory=PinConfig)
    adopt: AdoptConfig = field(default_factory=AdoptConfig)
    nova: NovaConfig = field(default_factory=NovaConfig)
    source: Path | None = None

    @property
    def backend_name(self) -> str:
        """The backend in use: [backend] name, else "emulated" for [dmemfs] emulate = true, else "dmemfs"."""
        if self.backend.name:
            return self.backend.name
        return "emulated" if self.dmemfs.emulate else "dmemfs"


BACKENDS = ("dmemfs", "hugetlbfs", "emulated")

_SECTIONS: dict[str, type] = {
    "host": HostConfig,
    "dmemfs": DmemfsConfig,
    "backend": BackendConfig,
    "hugetlbfs": HugetlbfsConfig,
    "libvirt": LibvirtConfig,
    "state": StateConfig,
    "pin": PinConfig,
    "adopt": AdoptConfig,
    "nova": NovaConfig,
}


def resolve_path(explicit: str | os.PathLike[str] | None, environ: dict[str, str] | None = None) -> Path:
    """The config file to read: --config, else $DMEM_LIBVIRT_CONFIG, else the default."""
    if explicit:
        return Path(explicit)
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    return DEFAULT_PATH


def load(path: str | os.PathLike[str] | None = None, *, required: bool | None = None) -> Config:
    """Read and validate the config file at ``path`` (see resolve_path)."""
    file = Path(path) if path is not None else DEFAULT_PATH
    must_exist = required if required is not None else file != DEFAULT_PATH
    try:
        with open(file, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        if must_exist:
            raise ConfigError(f"config file {file} does not exist") from None
        return Config()
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {file} is not valid TOML: {err}") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {file}: {err.strerror}") from None
    return parse(raw, source=file)


def parse(raw: dict[str, Any], *, source: Path | None = None) -> Config:
    """Build a Config from decoded TOML, refusing unknown keys by name."""
    where = f" in {source}" if source else ""
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown config section [{name}]{where}")
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{name}' must be a section{where}")
        sections[name] = _section(name, _SECTIONS[name], value, where)
    chosen = sections.get("backend", BackendConfig()).name
    if chosen and chosen != "emulated" and sections.get("dmemfs", DmemfsConfig()).emulate:
        raise ConfigError(f"[dmemfs] emulate = true contradicts [backend] name = \"{chosen}\"{where}; "
                          "remove emulate (write [backend] name = \"emulated\" for the emulation)")
    config = Config(**sections, source=source)
    if config.backend_name == "emulated" and "debugfs" not in raw.get("dmemfs", {}):
        # No debugfs-shaped directory named: the emulation keeps its counters beside the ledger.
        debugfs = config.state.dir / EMULATED_COUNTERS
        config = replace(config, dmemfs=replace(config.dmemfs, debugfs=debugfs))
    return config


def _section(name: str, cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key [{name}] {key}{where}")
        try:
            kwargs[key] = _convert(name, key, value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad value for [{name}] {key}{where}: {err}") from None
    return cls(**kwargs)


def _convert(section: str, key: str, value: Any) -> Any:
    if (section, key) in (("dmemfs", "capacity"), ("hugetlbfs", "limit")):
        if not isinstance(value, dict):
            raise TypeError("expected a table of node = size, e.g. 0 = \"16G\"")
        out: dict[int, int] = {}
        for node, size in value.items():
            if not str(node).isdigit():
                raise ValueError(f"node {node!r} is not a node number")
            out[int(node)] = parse_size(size)
        return out
    if key == "page_size" or (section, key) == ("nova", "reserve"):
        return parse_size(value)
    if section == "backend" and key == "name":
        if value not in BACKENDS:
            raise ValueError(f"{value!r} is not a backend; expected one of {', '.join(BACKENDS)}")
        return value
    if section == "adopt":
        if value not in ADOPT_MODES[key]:
            raise ValueError(f"expected one of {', '.join(repr(m) for m in ADOPT_MODES[key])}, got {value!r}")
        return value
    if key in ("emulate",):
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {value!r}")
        return value
    if key in ("lock_timeout", "orphan_grace"):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise TypeError(f"expected a number of seconds, got {value!r}")
        return float(value)
    if key == "threads":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"expected a whole number, got {value!r}")
        return value
    if not isinstance(value, str) or not value.startswith("/"):
        raise TypeError(f"expected an absolute path, got {value!r}")
    return Path(value)
