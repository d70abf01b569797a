"""`dmem-libvirt install-hook` / `uninstall-hook`: the installed file runs as libvirt runs it, foreign files
are never touched, and the QEMU driver's daemon is reloaded (SIGHUP) or the command fails naming what to run.

The daemon is a Python child that calls itself libvirtd (/proc/<pid>/comm) and records every SIGHUP.
"""

from __future__ import annotations

import ast
import io
import os
import shlex
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from testdriver import libvirt_formatted

from dmem_libvirt import cli, install

PLAIN_GUEST = b"""<domain type='kvm'>
  <name>plain</name>
  <uuid>0b7e2f6a-3f0e-4f7e-8f43-2c1c6f1d9a10</uuid>
  <memory unit='KiB'>262144</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
</domain>
"""
# What libvirt gives a hook: cwd /, an environment of LC_ALL, PATH and HOME only.
LIBVIRT_ENV = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}

FAKE_DAEMON = """
import signal, sys
marker, name = sys.argv[1], sys.argv[2]
if name:
    with open("/proc/self/comm", "w") as comm:
        comm.write(name)
def hup(signum, frame):
    with open(marker, "a") as out:
        out.write("SIGHUP\\n")
signal.signal(signal.SIGHUP, hup)
open(marker + ".ready", "w").close()
while True:
    signal.pause()
"""


@dataclass(frozen=True)
class Host:
    root: Path
    config: Path
    hooks_dir: Path
    run_dir: Path
    state_dir: Path

    @property
    def hook(self) -> Path:
        return self.hooks_dir / "qemu.d" / "50-dmem-libvirt"

    def dmem(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", str(self.config), *argv, "--hooks-dir", str(self.hooks_dir)],
                        stdin=io.BytesIO(b""), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
def host(tmp_path: Path) -> Host:
    """Install needs only the hooks dir, libvirt's run dir, the state dir and /proc (the real one)."""
    run_dir = tmp_path / "run" / "libvirt" / "qemu"
    run_dir.mkdir(parents=True)
    config = tmp_path / "config.toml"
    config.write_text(f'[host]\nproc = "/proc"\n\n[libvirt]\nrun_dir = "{run_dir}"\n'
                      f'hooks_dir = "{tmp_path / "unused-hooks"}"\n\n[state]\ndir = "{tmp_path / "state"}"\n')
    return Host(tmp_path, config, tmp_path / "hooks", run_dir, tmp_path / "state")


@dataclass(frozen=True)
class FakeDaemon:
    pid: int
    marker: Path

    def hangups(self, expected: int = 0, timeout: float = 5.0) -> int:
        """SIGHUPs received; waits up to ``timeout`` for ``expected`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            count = len(self.marker.read_text().splitlines()) if self.marker.exists() else 0
            if count >= expected or time.monotonic() > deadline:
                return count
            time.sleep(0.01)


def spawn_daemon(tmp_path: Path, name: str) -> Iterator[FakeDaemon]:
    marker = tmp_path / f"hangups-{name or 'unnamed'}"
    child = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON, str(marker), name])
    try:
        deadline = time.monotonic() + 10
        while not marker.with_name(marker.name + ".ready").exists():
            assert child.poll() is None, "the fake daemon died"
            assert time.monotonic() < deadline, "the fake daemon did not start"
            time.sleep(0.01)
        yield FakeDaemon(child.pid, marker)
    finally:
        child.terminate()
        child.wait(timeout=10)


@pytest.fixture
def libvirtd(host: Host) -> Iterator[FakeDaemon]:
    """A process named libvirtd whose pid is in <run_dir>/driver.pid, as the QEMU driver writes it."""
    for daemon in spawn_daemon(host.root, "libvirtd"):
        (host.run_dir / "driver.pid").write_text(f"{daemon.pid}\n")
        yield daemon


def installed_library_paths(hook: Path) -> list[str]:
    for line in hook.read_text().splitlines():
        if line.startswith("LIBRARY_PATHS"):
            value = ast.literal_eval(line.split("=", 1)[1].strip())
            assert isinstance(value, list)
            return [str(path) for path in value]
    raise AssertionError(f"no LIBRARY_PATHS line in {hook}")


# ---- the installed file ------------------------------------------------------------------------------


def test_installed_hook_is_executable_with_an_absolute_interpreter_and_one_flag_word(
        host: Host, libvirtd: FakeDaemon) -> None:
    code, out, err = host.dmem("install-hook")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"installed {host.hook}"
    mode = host.hook.stat().st_mode
    assert stat.S_ISREG(mode) and mode & 0o111 == 0o111
    text = host.hook.read_text()
    assert text.splitlines()[0] == "#!/bin/sh"
    # Our guests go on to this installation's own interpreter, named by its absolute path, isolated.
    assert install.hook_interpreter(text) == sys.executable
    assert Path(install.hook_interpreter(text)).is_absolute()
    assert '"$PYTHON" -IS "$0" "$@"' in text
    assert os.listdir(host.hook.parent) == ["50-dmem-libvirt"]
    assert not [p for p in host.hooks_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("operation", [
    ["prepare", "begin", "-"], ["start", "begin", "-"], ["started", "begin", "-"], ["stopped", "end", "-"],
    ["release", "end", "shutdown"], ["reconnect", "begin", "-"], ["migrate", "begin", "-"],
])
def test_installed_hook_runs_as_libvirt_runs_it_and_lets_a_plain_guest_through(
        host: Host, operation: list[str]) -> None:
    install.install_hook(host.hooks_dir)
    result = subprocess.run([str(host.hook), "plain", *operation], input=PLAIN_GUEST, capture_output=True,
                            env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


OURS = PLAIN_GUEST.replace(b"</uuid>", b'</uuid>\n  <metadata><dmem:memory xmlns:dmem="'
                          b'http://dmem-libvirt.org/xmlns/domain/1"/></metadata>')
FILE_BACKED = PLAIN_GUEST.replace(b"</uuid>", b"</uuid>\n  <memoryBacking><source type='file'/></memoryBacking>")
# Stands in for Python behind the hook's sh half: records its arguments and the stdin it was handed.
RECORDER = "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$0.args\"\ncat > \"$0.stdin\"\nexit 7\n"


def recording_hook(tmp_path: Path) -> tuple[Path, Path]:
    """The hook script whose interpreter is RECORDER; (hook, recorder)."""
    recorder = tmp_path / "python"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    hook = tmp_path / "50-dmem-libvirt"
    hook.write_text(install.render_hook(install.hook_template(), str(recorder), []))
    hook.chmod(0o755)
    return hook, recorder


@pytest.mark.parametrize("xml", [OURS, FILE_BACKED, OURS + b"\n\n\n", OURS.rstrip(b"\n")],
                         ids=["ours", "file-backed", "trailing-newlines", "no-newline"])
def test_installed_hook_hands_our_guests_xml_to_python_byte_for_byte(tmp_path: Path, xml: bytes) -> None:
    hook, recorder = recording_hook(tmp_path)
    result = subprocess.run([str(hook), "web01", "prepare", "begin", "-"], input=xml, capture_output=True,
                            env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    assert result.returncode == 7
    assert Path(f"{recorder}.stdin").read_bytes() == xml
    assert Path(f"{recorder}.args").read_text().splitlines() == ["-IS", str(hook), "web01", "prepare", "begin", "-"]


def test_installed_hook_reads_no_more_than_the_package_s_limit(tmp_path: Path) -> None:
    from dmem_libvirt.xmlsafe import MAX_XML_BYTES

    hook, recorder = recording_hook(tmp_path)
    huge = OURS + b" " * (MAX_XML_BYTES + 100 - len(OURS))
    result = subprocess.run([str(hook), "web01", "prepare", "begin", "-"], input=huge, capture_output=True,
                            env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    assert result.returncode == 7
    # One byte past the limit, as the package's own reader takes it: enough to refuse the document.
    assert Path(f"{recorder}.stdin").read_bytes() == huge[:MAX_XML_BYTES + 1]


def test_installed_hook_lets_a_guest_that_is_not_ours_pass_without_python(tmp_path: Path) -> None:
    hook, recorder = recording_hook(tmp_path)
    for operation in (["prepare", "begin", "-"], ["release", "end", "shutdown"]):
        result = subprocess.run([str(hook), "plain", *operation], input=PLAIN_GUEST, capture_output=True,
                                env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert not Path(f"{recorder}.args").exists()


@pytest.mark.parametrize("xml", [PLAIN_GUEST, PLAIN_GUEST.replace(b"  <vcpu>1</vcpu>\n", b"").rstrip(b"\n")],
                         ids=["as-libvirt-writes-it", "no-vcpu-no-newline"])
def test_installed_hook_lets_a_guest_that_is_not_ours_pass_without_starting_any_process(
        tmp_path: Path, xml: bytes) -> None:
    hook, recorder = recording_hook(tmp_path)
    # Every program the script could start records that it ran.
    spies = tmp_path / "bin"
    spies.mkdir()
    for program in ("head", "cat", "perl", "printf"):
        (spies / program).write_text(f"#!/bin/sh\ntouch {spies}/{program}.ran\nexit 1\n")
        (spies / program).chmod(0o755)
    env = {**LIBVIRT_ENV, "PATH": f"{spies}:{LIBVIRT_ENV['PATH']}"}
    result = subprocess.run([str(hook), "plain", "release", "end", "-"], input=xml, capture_output=True,
                            env=env, cwd="/", timeout=60, check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert sorted(p.name for p in spies.glob("*.ran")) == []
    assert not Path(f"{recorder}.args").exists()


# Elements in an order libvirt does not keep, text and a foreign element that look like <vcpu>.
SCRAMBLED = """<domain type='test'>
<vcpu>1</vcpu>
<os><type>hvm</type></os>
{backing}
<memory unit='MiB'>256</memory>
<name>scrambled</name>
<description>line one
  &lt;vcpu&gt; is only text here</description>
<metadata><vcpu xmlns='urn:other'>3</vcpu>{ours}</metadata>
</domain>"""


@pytest.mark.parametrize("ours,backing", [
    ('<dmem:memory xmlns:dmem="http://dmem-libvirt.org/xmlns/domain/1"/>', ""),
    ("", "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"),
], ids=["our-metadata", "file-backed"])
def test_installed_hook_finds_our_markers_in_the_xml_libvirt_hands_it(tmp_path: Path, ours: str, backing: str) -> None:
    xml = libvirt_formatted(SCRAMBLED.format(ours=ours, backing=backing))
    hook, recorder = recording_hook(tmp_path)
    result = subprocess.run([str(hook), "scrambled", "release", "end", "-"], input=xml, capture_output=True,
                            env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    assert result.returncode == 7
    assert Path(f"{recorder}.stdin").read_bytes() == xml


def test_installed_hook_refuses_only_where_a_refusal_stops_a_start_when_it_cannot_read_the_xml(
        tmp_path: Path) -> None:
    hook, recorder = recording_hook(tmp_path)
    broken = tmp_path / "bin"
    broken.mkdir()
    (broken / "head").write_text("#!/bin/sh\nexit 1\n")
    (broken / "head").chmod(0o755)
    env = {**LIBVIRT_ENV, "PATH": f"{broken}:{LIBVIRT_ENV['PATH']}"}
    calls = {operation: subprocess.run([str(hook), "web01", operation, subop, "-"], input=OURS, capture_output=True,
                                       env=env, cwd="/", timeout=60, check=False)
             for operation, subop in [("prepare", "begin"), ("reconnect", "begin"), ("release", "end")]}
    assert (calls["prepare"].returncode, calls["prepare"].stderr) == (
        1, b"dmem-libvirt: web01: the hook cannot read the domain XML from its stdin (head -c failed)\n")
    for operation in ("reconnect", "release"):
        assert (calls[operation].returncode, calls[operation].stderr) == (0, b"")
    assert not Path(f"{recorder}.args").exists()


def test_hook_script_passes_a_shell_syntax_check_as_lintian_runs_it(tmp_path: Path) -> None:
    hook, _ = recording_hook(tmp_path)
    checked = subprocess.run(["sh", "-n", str(hook)], capture_output=True, text=True, timeout=60, check=False)
    assert (checked.returncode, checked.stderr) == (0, "")


@pytest.mark.parametrize("python", ["/opt/my venv/bin/python3", "/opt/it's/bin/python3", "/opt/'''/python3"])
def test_any_interpreter_path_is_written_so_both_halves_of_the_script_still_parse(tmp_path: Path, python: str) -> None:
    hook = tmp_path / "50-dmem-libvirt"
    paths = ["/opt/it's", str(Path(python).parent)]
    hook.write_text(install.render_hook(install.hook_template(), python, paths))
    assert install.hook_interpreter(hook.read_text()) == python
    # The sh half's copy of the library paths, sent to the hook server, is the Python half's.
    assert installed_library_paths(hook) == paths
    [package_paths] = [line for line in hook.read_text().splitlines() if line.startswith("PACKAGE_PATHS=")]
    assert shlex.split(package_paths.removeprefix("PACKAGE_PATHS=")) == [":".join(paths)]
    checked = subprocess.run(["sh", "-n", str(hook)], capture_output=True, text=True, timeout=60, check=False)
    assert (checked.returncode, checked.stderr) == (0, "")
    ast.parse(hook.read_text())


def test_installed_hook_finds_the_package_and_lxml_through_its_library_paths(host: Host) -> None:
    install.install_hook(host.hooks_dir)
    paths = installed_library_paths(host.hook)
    assert str(Path(install.__file__).resolve().parent.parent) in paths
    probe = f"import sys; sys.path[:0] = {paths!r}; import lxml.etree, dmem_libvirt.domxml, dmem_libvirt.hook"
    result = subprocess.run([sys.executable, "-IS", "-c", probe], capture_output=True, text=True,
                            env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_library_paths_name_where_lxml_comes_from_when_it_is_outside_this_installation(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A venv made with --system-site-packages takes Debian's python3-lxml from /usr/lib/python3/dist-packages.
    import lxml

    monkeypatch.setattr(install.sysconfig, "get_paths", lambda: {"purelib": str(tmp_path), "platlib": str(tmp_path)})
    assert str(Path(lxml.__file__).resolve().parent.parent) in install.library_paths()


def test_hook_template_without_library_paths_cannot_find_the_package(tmp_path: Path) -> None:
    # What LIBRARY_PATHS is for: -I -S leaves no site-packages, no PYTHONPATH, no script directory.
    bare = tmp_path / "bare-hook"
    bare.write_text(install.render_hook(install.hook_template(), sys.executable, []))
    bare.chmod(0o755)
    ours = PLAIN_GUEST.replace(b"</uuid>", b'</uuid>\n  <metadata><dmem:memory xmlns:dmem="'
                               b'http://dmem-libvirt.org/xmlns/domain/1"/></metadata>')
    result = subprocess.run([str(bare), "plain", "prepare", "begin", "-"], input=ours, capture_output=True,
                            env={**LIBVIRT_ENV, "PYTHONPATH": str(Path(install.__file__).parent.parent)},
                            cwd="/", timeout=60, check=False)
    assert result.returncode == 1
    assert b"No module named 'dmem_libvirt'" in result.stderr


# ---- foreign files ---------------------------------------------------------------------------------------


def write_foreign(path: Path, text: str = "#!/bin/sh\nexit 0\n", mode: int = 0o750) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def test_install_refuses_to_clobber_a_hook_someone_else_wrote(host: Host, libvirtd: FakeDaemon) -> None:
    write_foreign(host.hook)
    code, out, err = host.dmem("install-hook")
    assert (code, out) == (1, "")
    assert err == f"dmem-libvirt: {host.hook} exists and was not written by dmem-libvirt; move it away first\n"
    assert host.hook.read_text() == "#!/bin/sh\nexit 0\n"
    assert stat.S_IMODE(host.hook.stat().st_mode) == 0o750
    assert libvirtd.hangups() == 0


def test_uninstall_leaves_a_foreign_file_with_our_name_alone(host: Host, libvirtd: FakeDaemon) -> None:
    write_foreign(host.hook)
    code, out, err = host.dmem("uninstall-hook")
    assert (code, out) == (1, "")
    assert err == f"dmem-libvirt: {host.hook} was not written by dmem-libvirt; not removing it\n"
    assert host.hook.read_text() == "#!/bin/sh\nexit 0\n"


def test_uninstall_removes_only_our_hook_and_reloads(host: Host, libvirtd: FakeDaemon) -> None:
    other = host.hooks_dir / "qemu.d" / "10-other"
    write_foreign(other, "#!/bin/sh\n# from dmem_libvirt.hook import entry is only quoted here\n")
    assert host.dmem("install-hook")[0] == 0
    assert libvirtd.hangups(1) == 1
    code, out, err = host.dmem("uninstall-hook")
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"removed {host.hook}", f"reloaded libvirtd (pid {libvirtd.pid})"]
    assert not host.hook.exists()
    assert other.read_text().startswith("#!/bin/sh\n")
    assert libvirtd.hangups(2) == 2


def test_uninstall_without_a_hook_does_nothing(host: Host, libvirtd: FakeDaemon) -> None:
    assert host.dmem("uninstall-hook") == (0, f"no hook at {host.hook}\n", "")
    assert libvirtd.hangups() == 0


def test_reinstall_replaces_our_own_hook(host: Host, libvirtd: FakeDaemon) -> None:
    assert host.dmem("install-hook")[0] == 0
    stale = host.hook.read_text().replace("LIBRARY_PATHS: list[str] = [", "LIBRARY_PATHS: list[str] = ['/stale', ")
    host.hook.write_text(stale)
    assert "/stale" in installed_library_paths(host.hook)
    assert host.dmem("install-hook")[0] == 0
    assert "/stale" not in installed_library_paths(host.hook)


# ---- reloading the daemon ------------------------------------------------------------------------------


def test_install_sends_sighup_to_the_daemon_named_in_driver_pid(host: Host, libvirtd: FakeDaemon) -> None:
    code, out, err = host.dmem("install-hook")
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == f"reloaded libvirtd (pid {libvirtd.pid})"
    assert libvirtd.hangups(1) == 1


def test_install_without_a_running_daemon_succeeds_and_says_when_the_hook_takes_effect(host: Host) -> None:
    # Provisioning installs the hook before libvirtd starts: nothing is wrong, libvirt reads it at start.
    code, out, err = host.dmem("install-hook")
    assert (code, err) == (0, "")
    assert out == (f"installed {host.hook}\n"
                   f"no libvirtd or virtqemud is running ({host.run_dir / 'driver.pid'} cannot be read "
                   "(No such file or directory)); libvirt reads its hooks when libvirtd starts\n")
    assert os.access(host.hook, os.X_OK)


def test_uninstall_without_a_running_daemon_succeeds(host: Host) -> None:
    assert host.dmem("install-hook")[0] == 0
    code, out, err = host.dmem("uninstall-hook")
    assert (code, err) == (0, "")
    assert out.startswith(f"removed {host.hook}\nno libvirtd or virtqemud is running")
    assert not host.hook.exists()


def test_modular_daemon_host_is_told_virtqemud_reads_the_hook(host: Host) -> None:
    (host.run_dir.parent / "virtqemud-sock").touch()
    code, out, _ = host.dmem("install-hook")
    assert code == 0
    assert out.endswith("libvirt reads its hooks when virtqemud starts\n")


def test_stale_driver_pid_of_another_program_is_not_signalled(host: Host) -> None:
    for other in spawn_daemon(host.root, ""):
        (host.run_dir / "driver.pid").write_text(f"{other.pid}\n")
        code, out, _ = host.dmem("install-hook")
        assert code == 0
        assert f"names pid {other.pid}, which is 'python" in out
        assert other.hangups(timeout=0.3) == 0


def test_driver_pid_of_a_dead_process_is_reported(host: Host) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    (host.run_dir / "driver.pid").write_text(f"{dead.pid}\n")
    code, out, _ = host.dmem("install-hook")
    assert code == 0
    assert f"names pid {dead.pid}, which is not running" in out


def test_reload_records_when_it_signalled_which_daemon(host: Host, libvirtd: FakeDaemon) -> None:
    before = time.time()
    assert host.dmem("install-hook")[0] == 0
    pid, when = (host.state_dir / install.RELOAD_STAMP).read_text().split()
    assert int(pid) == libvirtd.pid
    assert before <= float(when) <= time.time()


def test_daemon_that_cannot_be_signalled_is_told_the_kill_command(host: Host, libvirtd: FakeDaemon,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refuse)
    code, _, err = host.dmem("install-hook")
    assert code == 1
    assert err == (f"dmem-libvirt: cannot signal libvirtd (pid {libvirtd.pid}): Operation not permitted; "
                   f"run as root: kill -HUP {libvirtd.pid}\n")


def test_install_into_an_unusable_hooks_dir_is_one_line(host: Host, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--config", str(host.config), "install-hook", "--hooks-dir", str(blocker / "hooks")],
                    stdin=io.BytesIO(b""), stdout=out, stderr=err)
    assert (code, out.getvalue()) == (1, "")
    assert err.getvalue() == f"dmem-libvirt: cannot create {blocker / 'hooks' / 'qemu.d'}: Not a directory\n"
