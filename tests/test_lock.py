import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from dmem_libvirt.errors import DmemError, LockTimeout
from dmem_libvirt.lock import HostLock, holder_pid

FORK = multiprocessing.get_context("fork")
Holder = tuple[Path, BaseProcess]


def hold_until_killed(path: Path, acquired: Event) -> None:
    with HostLock(path, timeout=5.0):
        acquired.set()
        time.sleep(60)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Holder]:
    path = tmp_path / "lock"
    acquired = FORK.Event()
    child = FORK.Process(target=hold_until_killed, args=(path, acquired))
    child.start()
    try:
        assert acquired.wait(10), "the holder process never got the lock"
        yield path, child
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)


def test_a_second_process_gives_up_after_the_timeout_naming_the_holder_pid(holder: Holder) -> None:
    path, child = holder
    start = time.monotonic()
    with pytest.raises(LockTimeout) as caught, HostLock(path, timeout=0.5):
        pass
    elapsed = time.monotonic() - start
    # A bound, not a speed goal: never earlier than asked, never far later.
    assert 0.5 <= elapsed < 0.5 + 2.0
    assert caught.value.line() == f"dmem-libvirt: host lock {path} busy for 0.5 s, held by pid {child.pid}"


def test_holder_pid_names_the_other_process_while_it_holds_the_lock(holder: Holder) -> None:
    path, child = holder
    assert holder_pid(path) == child.pid


def test_the_lock_is_free_as_soon_as_the_holder_is_killed(holder: Holder) -> None:
    path, child = holder
    os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
    child.join(10)
    assert holder_pid(path) is None
    start = time.monotonic()
    with HostLock(path, timeout=5.0):
        assert holder_pid(path) == os.getpid()
    assert time.monotonic() - start < 5.0


def test_holder_pid_is_none_once_released_even_though_the_file_remembers_it(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    assert holder_pid(path) is None
    with HostLock(path, timeout=1.0):
        assert holder_pid(path) == os.getpid()
    assert path.read_text().strip() == str(os.getpid())
    assert holder_pid(path) is None


def test_a_zero_timeout_takes_a_free_lock(tmp_path: Path) -> None:
    with HostLock(tmp_path / "lock", timeout=0.0) as lock:
        assert holder_pid(lock.path) == os.getpid()


def test_the_lock_is_not_reentrant_within_one_process(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with HostLock(path, timeout=1.0), pytest.raises(LockTimeout, match=f"held by pid {os.getpid()}"), \
            HostLock(path, timeout=0.05):
        pass


def test_a_lock_file_that_cannot_be_created_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "missing-dir" / "lock"
    with pytest.raises(DmemError) as caught, HostLock(path, timeout=1.0):
        pass
    assert caught.value.line() == f"dmem-libvirt: cannot open host lock {path}: No such file or directory"
