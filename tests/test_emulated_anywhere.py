"""The emulated dmemfs on a host that has no debugfs-shaped directory: counters beside the ledger.

With `[dmemfs] emulate = true` and no `[dmemfs] debugfs`, the counters live in `<state dir>/emulated-dmem`,
sized from `[dmemfs.capacity]` (or 1 GiB per online node) in `[dmemfs] page_size` pages (or 2 MiB), and
follow a change of capacity without giving back pages that are pinned, until their file is gone.  A guest
goes through the hook on it.
"""

from __future__ import annotations

import stat
from pathlib import Path

from fakehost import make_host
from test_hook import Call, Rig, enabled, guest_xml, start_guest

from dmem_libvirt import config as config_mod
from dmem_libvirt import status
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import GiB, MiB


def without_debugfs(config_path: Path, extra: str = "") -> config_mod.Config:
    """The config at ``config_path`` without its [dmemfs] debugfs line, plus ``extra``."""
    text = "".join(line for line in config_path.read_text().splitlines(keepends=True)
                   if not line.startswith("debugfs ="))
    config_path.write_text(text + extra)
    return config_mod.load(config_path)


def pools(config: config_mod.Config) -> dict[int, tuple[int, int]]:
    data = status.collect(HookContext.create(config))
    return {pool["node"]: (pool["total"], pool["free"]) for pool in data["pools"]}


def test_counters_default_to_one_gib_per_online_node_beside_the_ledger(tmp_path: Path) -> None:
    made = make_host(tmp_path / "host", nodes=3, emulate=True)
    assert made.source is not None
    config = without_debugfs(made.source)
    assert config.dmemfs.debugfs == config.state.dir / "emulated-dmem"
    assert pools(config) == {0: (GiB, GiB), 1: (GiB, GiB), 2: (GiB, GiB)}
    assert HookContext.create(config).backend.page_size() == 2 * MiB
    assert stat.S_IMODE(config.dmemfs.debugfs.stat().st_mode) == 0o700
    assert (config.dmemfs.debugfs / "total_dpages").read_text() == "1536\n"


def test_counters_follow_the_configured_capacity_and_page_size(tmp_path: Path) -> None:
    made = make_host(tmp_path / "host", nodes=2, emulate=True)
    assert made.source is not None
    config = without_debugfs(made.source, '\n[dmemfs.capacity]\n0 = "64M"\n1 = "32M"\n')
    assert pools(config) == {0: (64 * MiB, 64 * MiB), 1: (32 * MiB, 32 * MiB)}


def test_a_capacity_change_keeps_pinned_pages_taken(tmp_path: Path) -> None:
    made = make_host(tmp_path / "host", nodes=1, emulate=True)
    assert made.source is not None
    config = without_debugfs(made.source, '\n[dmemfs.capacity]\n0 = "64M"\n')
    pinned = tmp_path / "guest-ram"
    pinned.touch()  # the pages are counted against the file, whatever it holds
    HookContext.create(config).backend.allocated("web01", pinned, 0, 16 * MiB)
    assert pools(config) == {0: (64 * MiB, 48 * MiB)}
    made.source.write_text(made.source.read_text().replace('0 = "64M"', '0 = "128M"'))
    assert pools(config_mod.load(made.source)) == {0: (128 * MiB, 112 * MiB)}
    made.source.write_text(made.source.read_text().replace('0 = "128M"', '0 = "8M"'))
    assert pools(config_mod.load(made.source)) == {0: (8 * MiB, 0)}
    pinned.unlink()
    assert pools(config_mod.load(made.source)) == {0: (8 * MiB, 8 * MiB)}


def test_a_named_debugfs_directory_is_used_as_it_is(tmp_path: Path) -> None:
    config = make_host(tmp_path / "host", nodes=1, emulate=True)
    assert config.dmemfs.debugfs != config.state.dir / "emulated-dmem"
    pools(config)
    assert not (config.state.dir / "emulated-dmem").exists()


def test_a_guest_runs_through_the_hook_on_counters_beside_the_ledger(rig: Rig) -> None:
    rig.config = without_debugfs(rig.config_path, '\n[dmemfs.capacity]\n0 = "64M"\n1 = "64M"\n')
    # Pinning binds to a real host node: node 0 is the one every machine has.
    xml = enabled(guest_xml("web01", [16 * MiB]), [0])
    running, _ = start_guest(rig, "web01", xml, 3, 4242)
    counters = rig.config.state.dir / "emulated-dmem"
    assert (counters / "node0" / "free_dpages").read_text() == "24\n"
    big = enabled(guest_xml("big02", [64 * MiB]), [0])
    refused = rig.call("big02", "prepare", "begin", big)
    assert refused.code == 1 and "host node 0" in refused.stderr
    rig.stopped("web01")
    assert rig.call("web01", "release", "end", running) == Call(0, "", "")
    assert (counters / "node0" / "free_dpages").read_text() == "32\n"
