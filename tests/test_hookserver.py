"""The hook server: the installed script hands it our guests' calls, and runs them itself whenever it cannot.

The script is rendered as `install-hook` writes it, asking a socket of the test's.  With no library paths it
cannot import the package itself (run with -I -S): a call that succeeds went through the server.  Hook calls
read /etc/dmem-libvirt/config.toml whoever runs them; here the server, and the copies of the package that
stand for other installations, read the fake host's instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakehost import make_host
from test_hook import enabled, guest_xml
from test_install import LIBVIRT_ENV, OURS, RECORDER

from dmem_libvirt import config as config_mod
from dmem_libvirt import hookserver, install
from dmem_libvirt.lifecycle import HookContext
from dmem_libvirt.units import MiB

SCRIPT_SOCKET = "SERVER_SOCKET=/run/dmem-libvirt/hook.sock\n"


SERVE = ("import sys; from pathlib import Path; from dmem_libvirt import cli, config; "
         "config.DEFAULT_PATH = Path(sys.argv[1]); sys.exit(cli.main(sys.argv[2:]))")


class Server:
    """`dmem-libvirt hook-server` on a socket of the test's, for the fake host's config."""

    def __init__(self, socket: Path, config: Path, package_parent: Path) -> None:
        self.socket = socket
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(config), "hook-server", "--socket", str(socket)],
            env={**LIBVIRT_ENV, "PYTHONPATH": str(package_parent)}, cwd="/")
        deadline = time.monotonic() + 30
        while not socket.is_socket():
            assert self.process.poll() is None, "the hook server exited before it listened"
            assert time.monotonic() < deadline, "the hook server did not listen within 30 s"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture
def host(tmp_path: Path) -> config_mod.Config:
    config = make_host(tmp_path / "host", nodes=2, emulate=True)
    assert config.source is not None
    return config


def installation(where: Path, config: config_mod.Config) -> list[str]:
    """A copy of the package at ``where`` whose hook calls read the fake host's config; its library paths."""
    shutil.copytree(Path(hookserver.__file__).parent, where / "dmem_libvirt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    module = where / "dmem_libvirt" / "config.py"
    default = 'DEFAULT_PATH = Path("/etc/dmem-libvirt/config.toml")'
    assert default in module.read_text()
    module.write_text(module.read_text().replace(default, f'DEFAULT_PATH = Path("{config.source}")'))
    return [str(where), str(Path(__import__("lxml").__file__).resolve().parent.parent)]


def hook_script(tmp_path: Path, socket: Path, paths: list[str], python: str = sys.executable) -> Path:
    script = tmp_path / "50-dmem-libvirt"
    text = install.render_hook(install.hook_template(), python, paths)
    assert SCRIPT_SOCKET in text
    script.write_text(text.replace(SCRIPT_SOCKET, f"SERVER_SOCKET={socket}\n"))
    script.chmod(0o755)
    return script


def prepare(script: Path, name: str) -> subprocess.CompletedProcess[bytes]:
    xml = enabled(guest_xml(name, [16 * MiB]), [0])
    return subprocess.run([str(script), name, "prepare", "begin", "-"], input=xml, capture_output=True,
                          env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)


def held(config: config_mod.Config) -> list[tuple[str, int]]:
    return sorted((entry.domain, entry.bytes) for entry in HookContext.create(config).ledger.snapshot()[0])


@pytest.fixture
def server(tmp_path: Path, host: config_mod.Config) -> Iterator[Server]:
    assert host.source is not None
    running = Server(tmp_path / "run" / "hook.sock", host.source, Path(hookserver.__file__).parent.parent)
    try:
        yield running
    finally:
        running.stop()


def test_our_guests_call_runs_in_the_server_and_the_hook_runs_it_itself_once_it_is_gone(
        tmp_path: Path, host: config_mod.Config, server: Server) -> None:
    script = hook_script(tmp_path, server.socket, [])
    result = prepare(script, "web01")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert held(host) == [("web01", 16 * MiB)]
    assert server.stop() == 0
    assert not server.socket.exists()
    # Without the server this script cannot import the package: what ran before was the server.
    result = prepare(script, "db02")
    assert result.returncode == 1
    assert b"the dmem-libvirt package cannot be imported" in result.stderr


def test_without_perl_the_hook_runs_our_guests_call_itself(tmp_path: Path, server: Server) -> None:
    # A PATH with head (the sh half reads the XML with it) but no perl: the server's client cannot start.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "head").symlink_to(shutil.which("head") or "/usr/bin/head")
    script = hook_script(tmp_path, server.socket, [])
    result = subprocess.run([str(script), "web01", "prepare", "begin", "-"],
                            input=enabled(guest_xml("web01", [16 * MiB]), [0]), capture_output=True,
                            env={**LIBVIRT_ENV, "PATH": str(bin_dir)}, cwd="/", timeout=60, check=False)
    # This script cannot import the package itself: its one line proves the call was not the server's.
    assert result.returncode == 1
    assert b"the dmem-libvirt package cannot be imported" in result.stderr


def test_a_refusal_reaches_libvirt_as_one_line_on_the_hooks_own_stderr(
        tmp_path: Path, host: config_mod.Config, server: Server) -> None:
    script = hook_script(tmp_path, server.socket, [])
    xml = enabled(guest_xml("big", [16 * MiB]), [0]).replace(b"16777216", b"17179869184")
    result = subprocess.run([str(script), "big", "prepare", "begin", "-"], input=xml, capture_output=True,
                            env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.decode().count("\n") == 1
    assert result.stderr.startswith(b"dmem-libvirt: big: ")
    assert held(host) == []


def test_a_script_of_another_installation_runs_its_call_itself(tmp_path: Path, host: config_mod.Config,
                                                                server: Server) -> None:
    script = hook_script(tmp_path, server.socket, installation(tmp_path / "other", host))
    result = prepare(script, "web01")
    assert (result.returncode, result.stderr) == (0, b"")
    assert held(host) == [("web01", 16 * MiB)]
    assert server.process.poll() is None  # another installation's call is no reason to stop


def test_after_an_upgrade_the_server_lets_the_hook_run_the_new_code_and_exits(
        tmp_path: Path, host: config_mod.Config) -> None:
    assert host.source is not None
    paths = installation(tmp_path / "site", host)
    server = Server(tmp_path / "hook.sock", host.source, Path(paths[0]))
    try:
        script = hook_script(tmp_path, server.socket, paths)
        upgraded = Path(paths[0]) / "dmem_libvirt" / "units.py"
        upgraded.write_text(upgraded.read_text() + "\n# upgraded\n")
        result = prepare(script, "web01")
        assert (result.returncode, result.stderr) == (0, b"")
        assert held(host) == [("web01", 16 * MiB)]
        assert server.process.wait(timeout=30) == 0
        assert not server.socket.exists()
    finally:
        server.stop()


def test_a_second_server_on_the_same_socket_is_refused_in_one_line(host: config_mod.Config, server: Server) -> None:
    command = [sys.executable, "-c", SERVE, str(host.source), "hook-server", "--socket", str(server.socket)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (
        1, f"dmem-libvirt: a hook server already listens on {server.socket}\n")


def test_the_scripts_socket_and_header_are_the_servers() -> None:
    text = install.hook_template()
    assert f"SERVER_SOCKET={hookserver.SOCKET}\n" in text
    assert f"SERVER_HEADER={hookserver.HEADER.decode()}\n" in text


def test_a_listener_is_for_root_alone(tmp_path: Path, server: Server) -> None:
    assert oct(server.socket.stat().st_mode & 0o777) == oct(0o600)
    assert os.stat(server.socket.parent).st_mode & 0o077 == 0


class FakeServer:
    """A listener on the script's socket that answers every call with ``reply`` and closes."""

    def __init__(self, socket_path: Path, reply: bytes) -> None:
        import socket as socket_module
        import threading

        self.listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        self.listener.bind(str(socket_path))
        self.listener.listen(1)
        self.reply = reply
        self.thread = threading.Thread(target=self._answer, daemon=True)
        self.thread.start()

    def _answer(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while conn.recv(1 << 16):
                pass
            conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(timeout=30)
        self.listener.close()


@pytest.mark.parametrize("operation, subop, code, line", [
    ("prepare", "begin", 1, b"dmem-libvirt: web01: the call ended without an answer (its process died); "
                            b"see the system log\n"),
    ("release", "end", 0, b""),
], ids=["a-start-is-refused", "a-release-never-fails"])
def test_a_worker_that_ended_in_the_call_counts_as_a_killed_hook_never_as_a_call_to_run_again(
        tmp_path: Path, operation: str, subop: str, code: int, line: bytes) -> None:
    fake = FakeServer(tmp_path / "hook.sock", b"run\n")
    try:
        script = hook_script(tmp_path, tmp_path / "hook.sock", [])
        result = subprocess.run([str(script), "web01", operation, subop, "-"],
                                input=enabled(guest_xml("web01", [16 * MiB]), [0]), capture_output=True,
                                env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    finally:
        fake.close()
    assert (result.returncode, result.stderr) == (code, line)


@pytest.mark.parametrize("reply", [b"skip\n", b"", b"what?\n"], ids=["skip", "nothing", "garbage"])
def test_a_server_that_did_not_begin_the_call_leaves_it_to_the_script(tmp_path: Path, reply: bytes) -> None:
    fake = FakeServer(tmp_path / "hook.sock", reply)
    try:
        # No library paths: the script's own run ends in its one line about the import.
        script = hook_script(tmp_path, tmp_path / "hook.sock", [])
        result = prepare(script, "web01")
    finally:
        fake.close()
    assert result.returncode == 1
    assert b"the dmem-libvirt package cannot be imported" in result.stderr


def recording_script(tmp_path: Path, socket: Path) -> tuple[Path, Path]:
    """The hook script asking ``socket``, whose interpreter records what it is handed; (script, recorder).

    The recorder exits 2, a status of the Python half's own (the script takes others for a process that died).
    """
    recorder = tmp_path / "python"
    assert "exit 7" in RECORDER
    recorder.write_text(RECORDER.replace("exit 7", "exit 2"))
    recorder.chmod(0o755)
    return hook_script(tmp_path, socket, [], str(recorder)), recorder


# Larger than a pipe's buffer: whoever hands the XML on must keep writing while the reader reads.
LARGE = OURS.replace(b"</domain>", b"  <devices>\n" + b"    <!-- padding -->\n" * 8000 + b"  </devices>\n</domain>")


@pytest.mark.parametrize("xml", [OURS, OURS.rstrip(b"\n"), OURS + b"\n\n", LARGE],
                         ids=["ours", "no-newline", "trailing-newlines", "larger-than-a-pipe"])
def test_a_call_the_server_did_not_begin_gets_the_whole_xml_and_the_arguments_unchanged(
        tmp_path: Path, xml: bytes) -> None:
    fake = FakeServer(tmp_path / "hook.sock", b"skip\n")
    try:
        script, recorder = recording_script(tmp_path, tmp_path / "hook.sock")
        result = subprocess.run([str(script), "web01", "prepare", "begin", "-"], input=xml, capture_output=True,
                                env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
    finally:
        fake.close()
    assert result.returncode == 2
    assert Path(f"{recorder}.stdin").read_bytes() == xml
    assert Path(f"{recorder}.args").read_text().splitlines() == ["-IS", str(script), "web01", "prepare", "begin", "-"]


def test_an_xml_whose_head_is_too_long_for_an_argument_is_run_here_without_the_server(tmp_path: Path) -> None:
    import socket as socket_module

    listener = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    listener.bind(str(tmp_path / "hook.sock"))
    listener.listen(1)
    listener.setblocking(False)
    # 100 KiB of another application's metadata before ours: more than PREFIX_LIMIT in one argument.
    xml = OURS.replace(b"<metadata>", b"<metadata>\n" + b"    <!-- another application's -->\n" * 3200)
    try:
        script, recorder = recording_script(tmp_path, tmp_path / "hook.sock")
        result = subprocess.run([str(script), "web01", "prepare", "begin", "-"], input=xml, capture_output=True,
                                env=LIBVIRT_ENV, cwd="/", timeout=60, check=False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert result.returncode == 2
    assert Path(f"{recorder}.stdin").read_bytes() == xml
