"""`status`, `reconcile` and `check` on fake hosts: what an operator reads, what cleanup frees, what check flags.

reconcile must free what no live guest owns and nothing younger than [state] orphan_grace; check must
report each broken piece of an installation with its fix and exit 1 when any is broken.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakehost import PROC, QEMU_CONF, RUN_DIR, free_pages, make_host

from dmem_libvirt import cli, define, install, status
from dmem_libvirt.config import Config
from dmem_libvirt.ledger import Reservation
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import GiB, MiB

UUID_A = "11111111-2222-4333-8444-555555555501"
UUID_B = "11111111-2222-4333-8444-555555555502"
UUID_C = "11111111-2222-4333-8444-555555555503"
HOUR = 3600.0

WEB01 = """<domain type='kvm' id='3'>
  <name>web01</name>
  <uuid>11111111-2222-4333-8444-555555555509</uuid>
  <memory unit='GiB'>2</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu>
    <numa>
      <cell id='0' cpus='0' memory='1' unit='GiB'/>
      <cell id='1' cpus='1' memory='1' unit='GiB'/>
    </numa>
  </cpu>
</domain>
"""


def dmem(config: Config, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--config", str(config.source), *argv], stdin=io.BytesIO(b""), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def root_of(config: Config) -> Path:
    assert config.source is not None
    return config.source.parent


def reservation(domain: str, uuid: str, node: int, size: int, *, state: str = "reserved", created: float,
                file: str = "pc.ram", pid: int | None = None, path: Path | None = None) -> Reservation:
    inode = path.stat().st_ino if path is not None else None
    return Reservation(domain=domain, uuid=uuid, node=node, bytes=size, page_size=2 * MiB, backend="dmemfs",
                       file=file, state=state, origin="prepare", created=created,
                       path=str(path) if path else None, inode=inode, pid=pid)


def book(config: Config, *entries: Reservation) -> None:
    with HookContext.create(config).ledger.transaction() as ledger:
        for entry in entries:
            ledger.add(entry)


def held(config: Config) -> list[tuple[str, int, int, str]]:
    return sorted((e.domain, e.node, e.bytes, e.state) for e in HookContext.create(config).ledger.read())


def live_process(config: Config, pid: int, comm: str = "qemu-system-x86", started_ticks: int = 0) -> None:
    """A /proc/<pid> in the fake proc tree, as the kernel shows a sleeping process."""
    directory = root_of(config) / PROC / str(pid)
    directory.mkdir(parents=True, exist_ok=True)
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(started_ticks)] + ["0"] * 30
    (directory / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
    (directory / "comm").write_text(comm + "\n")


@pytest.fixture
def host(tmp_path: Path) -> Config:
    return make_host(tmp_path / "host", nodes=2)


# ---- status ---------------------------------------------------------------------------------------


def test_status_sums_reserved_and_pinned_per_node_and_groups_per_domain(host: Config) -> None:
    now = time.time()
    book(host, reservation("web01", UUID_A, 0, GiB, file="ram-node0", created=now),
         reservation("web01", UUID_A, 1, GiB, file="ram-node1", created=now),
         reservation("db02", UUID_B, 1, 512 * MiB, state="pinned", created=now, pid=4321))
    data = status.collect(HookContext.create(host))
    assert [(p["node"], p["reserved"], p["pinned"]) for p in data["pools"]] == [(0, GiB, 0), (1, GiB, 512 * MiB)]
    assert [(d["name"], d["nodes"], d["bytes"], d["state"]) for d in data["domains"]] == [
        ("db02", [1], 512 * MiB, "pinned"), ("web01", [0, 1], 2 * GiB, "reserved")]
    code, out, err = dmem(host, "status")
    assert (code, err) == (0, "")
    assert "   1      8.0 GiB      8.0 GiB      1.0 GiB    512.0 MiB" in out
    assert "web01                    0,1          2.0 GiB  reserved  -" in out
    assert "db02                     1          512.0 MiB  pinned    4321" in out


# ---- reconcile -------------------------------------------------------------------------------------


def test_reconcile_frees_old_reservations_of_dead_guests_and_keeps_live_and_young_ones(host: Config) -> None:
    now = time.time()
    live_process(host, 4321)
    book(host, reservation("dead", UUID_A, 0, GiB, created=now - HOUR, pid=999999),
         reservation("alive", UUID_B, 1, 2 * GiB, created=now - HOUR, pid=4321),
         reservation("starting", UUID_C, 1, 512 * MiB, created=now - 10))
    code, out, err = dmem(host, "reconcile")
    assert (code, err) == (0, "")
    assert out == "freed dead (1.0 GiB on node 0)\n"
    assert held(host) == [("alive", 1, 2 * GiB, "reserved"), ("starting", 1, 512 * MiB, "reserved")]


def dead_pinned_guest(tmp_path: Path, pid: int | None = None) -> tuple[Config, Path]:
    """A guest pinned 1 GiB on node 0 an hour ago, whose QEMU is gone; its config and RAM file."""
    config = make_host(tmp_path / "host", nodes=2, emulate=True)
    directory = config.dmemfs.mount / "libvirt" / "qemu" / "5-gone"
    directory.mkdir(parents=True)
    ram = directory / "pc.ram"
    ram.write_bytes(b"\0" * 4096)
    os.utime(directory, (time.time() - HOUR, time.time() - HOUR))
    HookContext.create(config).backend.allocated("gone", ram, 0, GiB)  # what pinning 1 GiB took from node 0
    book(config, reservation("gone", UUID_A, 0, GiB, state="pinned", created=time.time() - HOUR, path=ram,
                            pid=pid))
    return config, ram


def test_reconcile_dry_run_says_what_it_would_free_and_why_and_changes_nothing(tmp_path: Path) -> None:
    config, ram = dead_pinned_guest(tmp_path, pid=999999)
    directory = ram.parent
    code, out, err = dmem(config, "reconcile", "--dry-run")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "would free gone (1.0 GiB on node 0): QEMU pid 999999 is gone, libvirt runs no such guest, "
        "nothing maps its files; reserved 3600 s ago",
        f"would free {directory} (4.0 KiB): no running guest has this memory directory and nothing maps its files"]
    assert ram.exists()
    assert free_pages(config, 0) == 4096 - 512
    assert held(config) == [("gone", 0, GiB, "pinned")]


def test_reconcile_never_frees_within_the_grace_period(host: Config) -> None:
    now = time.time()
    book(host, reservation("dead", UUID_A, 0, GiB, created=now - 200))
    ctx = HookContext.create(host)
    assert status.reconcile(ctx) == []
    assert held(host) == [("dead", 0, GiB, "reserved")]
    # The same entry once [state] orphan_grace (300 s) has passed.
    ctx.clock = lambda: now + 101
    assert status.reconcile(ctx) == ["freed dead (1.0 GiB on node 0)"]
    assert held(host) == []


def test_reconcile_with_nothing_to_do_says_so(host: Config) -> None:
    assert dmem(host, "reconcile") == (
        0, "nothing to do: every reservation belongs to a live guest or is within the grace period\n", "")


def test_reconcile_deletes_a_dead_guests_pinned_file_and_gives_its_pages_back(tmp_path: Path) -> None:
    config, ram = dead_pinned_guest(tmp_path)
    code, out, err = dmem(config, "reconcile")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "freed gone (1.0 GiB on node 0)"
    assert not ram.exists()
    assert free_pages(config, 0) == 4096
    assert held(config) == []


def test_reconcile_removes_old_memory_directories_no_guest_runs_in(host: Config) -> None:
    base = host.dmemfs.mount / "libvirt" / "qemu"
    old, young = base / "7-crashed", base / "8-booting"
    for directory in (old, young):
        directory.mkdir(parents=True)
        (directory / "ram-node0").write_bytes(b"x")
    os.utime(old, (time.time() - HOUR, time.time() - HOUR))
    code, out, _ = dmem(host, "reconcile")
    assert code == 0
    assert out.startswith(f"freed {old} (")
    assert not old.exists()
    assert (young / "ram-node0").exists()


def test_reconcile_adopts_a_running_guest_the_ledger_lost(host: Config) -> None:
    enabled = define.plan(WEB01, page_size=2 * MiB, rooms=None, nodes=[0, 1]).rewritten.decode()
    body = enabled.split("?>", 1)[-1] if enabled.startswith("<?xml") else enabled
    run_dir = root_of(host) / RUN_DIR
    (run_dir / "web01.xml").write_text(f"<domstatus state='running' pid='4321'>\n{body}</domstatus>\n")
    (run_dir / "web01.pid").write_text("4321")
    live_process(host, 4321)
    directory = host.dmemfs.mount / "libvirt" / "qemu" / "3-web01"
    directory.mkdir(parents=True)
    (directory / "ram-node0").write_bytes(b"")
    (directory / "ram-node1").write_bytes(b"")
    code, out, err = dmem(host, "reconcile")
    assert (code, err) == (0, "")
    assert "adopted web01: 1.0 GiB on node 0 (ram-node0)" in out.splitlines()
    assert "adopted web01: 1.0 GiB on node 1 (ram-node1)" in out.splitlines()
    assert held(host) == [("web01", 0, GiB, "pinned"), ("web01", 1, GiB, "pinned")]
    # Adopted, not orphaned: a second pass leaves it alone.
    assert dmem(host, "reconcile")[1].startswith("nothing to do")


# ---- check ----------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs_root() -> Iterator[Path]:
    """A directory on tmpfs, where the emulated dmemfs keeps guest RAM files."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.fail("/dev/shm (tmpfs) is missing: the emulated dmemfs needs a tmpfs to check against")
    root = Path(tempfile.mkdtemp(prefix="dmem-check-", dir=shm))
    yield root
    shutil.rmtree(root)


def fake_daemon(config: Config, pid: int, started_ago: float, name: str = "libvirtd") -> None:
    """A daemon owning libvirt's QEMU driver state, started ``started_ago`` seconds ago."""
    ticks = os.sysconf("SC_CLK_TCK")
    boot = int(time.time()) - 10 * 24 * 3600
    live_process(config, pid, name, started_ticks=int((time.time() - started_ago - boot) * ticks))
    proc = root_of(config) / PROC
    (proc / "stat").write_text(f"cpu  1 2 3 4\nbtime {boot}\nprocesses 9\n")
    (root_of(config) / RUN_DIR / "driver.pid").write_text(f"{pid}\n")


def healthy(root: Path) -> Config:
    config = make_host(root / "host", nodes=2, emulate=True)
    hook = install.install_hook(config.libvirt.hooks_dir)
    os.utime(hook, (time.time() - HOUR, time.time() - HOUR))
    fake_daemon(config, 4242, started_ago=60)
    return config


def findings(config: Config) -> tuple[int, list[str]]:
    code, out, err = dmem(config, "check")
    assert err == ""
    return code, out.splitlines()


def failures(lines: list[str]) -> list[tuple[str, str]]:
    """(finding, fix) for every FAIL line."""
    found = []
    for index, line in enumerate(lines):
        if line.startswith("FAIL  "):
            fix = lines[index + 1] if index + 1 < len(lines) else ""
            found.append((line[6:], fix.strip().removeprefix("fix: ")))
    return found


def test_check_of_a_working_installation_passes(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    code, lines = findings(config)
    assert failures(lines) == []
    assert code == 0
    assert f"ok    {config.dmemfs.mount} is a tmpfs (emulated dmemfs) mount" in lines
    assert "ok    libvirtd (pid 4242) has seen the hook" in lines
    assert "ok    page size 2 MiB" in lines


def test_check_flags_a_missing_hook(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    install.hook_path(config.libvirt.hooks_dir).unlink()
    code, lines = findings(config)
    assert code == 1
    assert failures(lines) == [(f"hook {install.hook_path(config.libvirt.hooks_dir)} is missing",
                                "dmem-libvirt install-hook")]


def test_check_flags_a_hook_that_is_not_executable(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    hook = install.hook_path(config.libvirt.hooks_dir)
    hook.chmod(0o644)
    code, lines = findings(config)
    assert code == 1
    assert failures(lines) == [(f"hook {hook} is not executable", f"chmod 755 {hook}")]


def test_check_flags_a_daemon_that_started_before_the_hook_was_written(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    hook = install.hook_path(config.libvirt.hooks_dir)
    os.utime(hook, (time.time() - 5, time.time() - 5))
    code, lines = findings(config)
    assert code == 1
    assert failures(lines) == [("libvirtd (pid 4242) has not seen the hook: it started before the hook was "
                                "written and was not reloaded since",
                                "kill -HUP 4242 (or systemctl reload libvirtd)")]
    # A reload of that very daemon by install-hook counts as seeing it.
    (config.state.dir / install.RELOAD_STAMP).write_text(f"4242 {time.time()}\n")
    assert findings(config)[0] == 0


def test_check_flags_a_daemon_that_is_not_running(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    shutil.rmtree(root_of(config) / PROC / "4242")
    code, lines = findings(config)
    assert code == 1
    [(what, fix)] = failures(lines)
    assert "no running libvirtd or virtqemud has loaded the hook" in what and "not running" in what
    assert fix == "systemctl reload-or-restart libvirtd"


def test_check_flags_a_hook_whose_interpreter_is_gone(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    hook = install.hook_path(config.libvirt.hooks_dir)
    hook.write_text(install.render_hook(install.hook_template(), "/opt/removed-venv/bin/python3",
                                        install.library_paths()))
    os.utime(hook, (time.time() - HOUR, time.time() - HOUR))
    code, out = findings(config)
    assert code == 1
    assert failures(out) == [("the hook's interpreter /opt/removed-venv/bin/python3 is not executable",
                              "dmem-libvirt install-hook")]


def test_check_flags_a_memory_backing_dir_off_the_dmemfs_mount(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    (root_of(config) / QEMU_CONF).write_text('memory_backing_dir = "/var/lib/libvirt/qemu/ram"\n')
    code, lines = findings(config)
    assert code == 1
    assert failures(lines) == [(f"libvirt memory_backing_dir /var/lib/libvirt/qemu/ram is not on "
                                f"{config.dmemfs.mount}",
                                f'set memory_backing_dir = "{config.dmemfs.mount}" in '
                                f"{config.libvirt.qemu_conf} and restart libvirtd")]


def test_check_flags_a_missing_mount(tmpfs_root: Path) -> None:
    config = healthy(tmpfs_root)
    config.dmemfs.mount.rmdir()
    code, lines = findings(config)
    assert code == 1
    what, fix = failures(lines)[0]
    assert what == f"{config.dmemfs.mount} cannot be examined: No such file or directory"
    assert fix == f"mkdir -p {config.dmemfs.mount} && mount -t tmpfs none {config.dmemfs.mount}"


def test_check_flags_a_mount_of_the_wrong_filesystem(host: Config) -> None:
    # The fake host lives on the test's tmp directory, which is no dmemfs.
    code, lines = findings(host)
    assert code == 1
    mount = host.dmemfs.mount
    [(what, fix)] = [f for f in failures(lines) if f[0].startswith(str(mount))]
    assert what.startswith(f"{mount} is not a dmemfs mount (filesystem magic 0x")
    assert what.endswith("expected 0x2ace90c6)")
    assert fix.startswith(f"mkdir -p {mount} && mount -t dmemfs none -o pagesize=2M {mount}")


def test_check_flags_unreadable_debugfs_unless_capacity_is_declared(tmpfs_root: Path) -> None:
    config = make_host(tmpfs_root / "host", nodes=1, emulate=True, debugfs=False, page_size=2 * MiB)
    install.install_hook(config.libvirt.hooks_dir)
    os.utime(install.hook_path(config.libvirt.hooks_dir), (time.time() - HOUR, time.time() - HOUR))
    fake_daemon(config, 4242, started_ago=60)
    code, lines = findings(config)
    assert code == 1
    debugfs = config.dmemfs.debugfs
    assert failures(lines) == [(f"dmem statistics in {debugfs} unreadable and no [dmemfs.capacity] declared",
                                f"mount -t debugfs none {debugfs.parent}, or declare [dmemfs.capacity] per node "
                                f"in {config.source}")]
    with open(root_of(config) / "config.toml", "a") as toml:
        toml.write('\n[dmemfs.capacity]\n0 = "4G"\n')
    code, lines = findings(config)
    assert code == 0
    assert f"ok    dmem statistics in {debugfs} unreadable; using [dmemfs.capacity]" in lines


def test_check_flags_a_configured_page_size_the_kernel_contradicts(tmpfs_root: Path) -> None:
    config = make_host(tmpfs_root / "host", nodes=1, emulate=True, page_size=4096)
    code, lines = findings(config)
    assert code == 1
    [(what, fix)] = [f for f in failures(lines) if "page_size" in f[0]]
    assert what == f"[dmemfs] page_size is 4 KiB but {config.dmemfs.debugfs / 'dpage_shift'} says 2 MiB; " \
                   "fix the config or remount dmemfs"
    assert fix == "make [dmemfs] page_size match the mount's pagesize="


def test_check_flags_1_gib_pages_that_libvirt_cannot_back_guest_ram_with(tmpfs_root: Path) -> None:
    config = make_host(tmpfs_root / "host", nodes=[], emulate=True, page_shift=30)
    code, lines = findings(config)
    assert code == 1
    [(what, fix)] = [f for f in failures(lines) if f[0].startswith("page size")]
    assert what == "page size 1 GiB: libvirt cannot align guest RAM to 1 GiB on dmemfs, so no guest can use it"
    assert "pagesize=2M" in fix


def test_check_output_is_binary_units_and_one_finding_per_line(tmpfs_root: Path) -> None:
    code, lines = findings(healthy(tmpfs_root))
    assert code == 0
    assert all(line.startswith(("ok    ", "FAIL  ", "      fix: ")) for line in lines)
    assert not any(" MB" in line or " GB" in line for line in lines)
