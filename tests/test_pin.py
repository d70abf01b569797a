"""pin_file on a real tmpfs, with real threads and real mbind.

There is no dmemfs here: tmpfs stands in for it (shared files, mbind through tmpfs's shared policy,
a size= limit that makes MADV_POPULATE_WRITE fail as an exhausted dmem pool would).
"""

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmem_libvirt import numa, procmaps
from dmem_libvirt.errors import PinError
from dmem_libvirt.pin import PinnedFile, fill_pattern, pin_file, remove_file, scan_for

PAGE = 4096
MiB = 1 << 20
DIRTY = b"DIRTY!!!"
QEMU_UID = 64055
QEMU_GID = 64055
PROC = Path("/proc")


def mount_tmpfs(directory: Path, size: int) -> None:
    """Mount a real tmpfs of ``size`` bytes on ``directory``; fail (not skip) saying what is missing."""
    directory.mkdir(mode=0o700, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, (
        f"these tests need root and util-linux mount to mount a tmpfs: {done.stderr.strip()}")


def unmount(directory: Path) -> None:
    subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture
def mem_dir(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs standing for the per-domain memory directory on dmemfs."""
    directory = tmp_path / "mem"
    mount_tmpfs(directory, 64 * MiB)
    try:
        yield directory.resolve()
    finally:
        unmount(directory)


@pytest.fixture
def small_dir(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: a pool too small for a 16 MiB guest."""
    directory = tmp_path / "small"
    mount_tmpfs(directory, 8 * MiB)
    try:
        yield directory.resolve()
    finally:
        unmount(directory)


def pin(directory: Path, size: int = 4 * MiB, name: str = "ram-node0", **kwargs: object) -> PinnedFile:
    options: dict[str, object] = {"page_size": PAGE, "uid": QEMU_UID, "gid": QEMU_GID}
    options.update(kwargs)
    return pin_file(directory, name, size, 0, **options)  # type: ignore[arg-type]


def dirty_file(directory: Path, name: str, size: int) -> Path:
    """A file whose pages hold the previous tenant's pattern, written through the same primitives."""
    path = directory / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        address = numa.map_shared(fd, size)
        try:
            numa.populate_write(address, size)
            fill_pattern(DIRTY)(address, size)
        finally:
            numa.unmap(address, size)
    finally:
        os.close(fd)
    return path


def used_bytes(directory: Path) -> int:
    stats = os.statvfs(directory)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def test_pinned_file_has_exact_size_qemu_owner_and_mode_0600(mem_dir: Path) -> None:
    result = pin(mem_dir, 6 * MiB)

    info = os.stat(mem_dir / "ram-node0", follow_symlinks=False)
    assert info.st_size == 6 * MiB
    assert (info.st_uid, info.st_gid) == (QEMU_UID, QEMU_GID)
    assert info.st_mode & 0o7777 == 0o600
    assert (result.path, result.inode, result.device, result.size, result.node) == (
        mem_dir / "ram-node0", info.st_ino, info.st_dev, 6 * MiB, 0)
    assert result.seconds > 0


def test_every_page_is_allocated_by_the_pin_not_left_for_qemu_to_fault(mem_dir: Path) -> None:
    pin(mem_dir, 6 * MiB)

    assert used_bytes(mem_dir) == 6 * MiB


def test_fill_pattern_control_really_leaves_the_previous_tenants_data(mem_dir: Path) -> None:
    path = dirty_file(mem_dir, "previous", 4 * MiB)

    data = path.read_bytes()
    pages = [data[at:at + 4096] for at in range(0, len(data), 4096)]
    assert len(pages) == 1024
    assert all(page.startswith(DIRTY) and page.endswith(DIRTY) for page in pages)
    assert scan_for(path, DIRTY) == 2 * len(pages)


def test_no_byte_of_the_previous_tenant_survives_the_pin(mem_dir: Path) -> None:
    result = pin(mem_dir, 4 * MiB, fill=fill_pattern(DIRTY))

    assert scan_for(result.path, DIRTY) == 0
    assert result.path.read_bytes() == bytes(4 * MiB)


def test_fill_runs_after_allocation_so_zeroing_must_cover_it(mem_dir: Path) -> None:
    seen: list[tuple[int, int]] = []
    dirty = fill_pattern(DIRTY)

    def recording_fill(address: int, length: int) -> None:
        seen.append((address, length))
        dirty(address, length)

    result = pin(mem_dir, 2 * MiB, fill=recording_fill)

    assert [length for _, length in seen] == [2 * MiB]
    assert scan_for(result.path, DIRTY) == 0


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_any_thread_count_gives_the_same_zeroed_file(mem_dir: Path, threads: int) -> None:
    size = 37 * PAGE  # not divisible by 2, 3 or 4 pages: the last chunk is uneven
    result = pin(mem_dir, size, threads=threads, cpus=frozenset(os.sched_getaffinity(0)),
                 fill=fill_pattern(DIRTY))

    digest = hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(bytes(size)).hexdigest()
    assert used_bytes(mem_dir) == size


def test_more_threads_than_pages_still_zeroes_the_file(mem_dir: Path) -> None:
    result = pin(mem_dir, PAGE, threads=4, fill=fill_pattern(DIRTY))

    assert result.path.read_bytes() == bytes(PAGE)


def test_pinning_with_node_cpus_leaves_the_callers_affinity_alone(mem_dir: Path) -> None:
    before = os.sched_getaffinity(0)

    pin(mem_dir, MiB, threads=2, cpus=frozenset({min(before)}))

    assert os.sched_getaffinity(0) == before


def test_set_thread_cpus_restricts_only_the_calling_thread() -> None:
    before = os.sched_getaffinity(0)
    inside: list[set[int]] = []

    def worker() -> None:
        numa.set_thread_cpus(frozenset({min(before)}))
        inside.append(os.sched_getaffinity(0))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()

    assert inside == [{min(before)}]
    assert os.sched_getaffinity(0) == before


def test_mapping_the_pinned_file_and_binding_it_shows_bind_0_in_numa_maps(mem_dir: Path) -> None:
    result = pin(mem_dir, 2 * MiB)
    fd = os.open(result.path, os.O_RDWR)
    address = numa.map_shared(fd, result.size)
    try:
        numa.mbind(address, result.size, 0)
        assert procmaps.numa_policy(PROC, os.getpid(), result.path) == "bind:0"
    finally:
        numa.unmap(address, result.size)
        os.close(fd)


def test_a_fresh_mapping_of_the_pinned_file_inherits_bind_0_from_tmpfs_shared_policy(mem_dir: Path) -> None:
    # tmpfs keeps an mbind policy on the inode (shmem shared policy), so QEMU's own later mapping
    # reports it too.  dmemfs has no shared policy: there only the pages' placement persists.
    result = pin(mem_dir, 2 * MiB)
    never_pinned = mem_dir / "other"
    never_pinned.write_bytes(bytes(PAGE))
    fds = [os.open(result.path, os.O_RDWR), os.open(never_pinned, os.O_RDWR)]
    mappings = [numa.map_shared(fds[0], result.size), numa.map_shared(fds[1], PAGE)]
    try:
        assert procmaps.numa_policy(PROC, os.getpid(), result.path) == "bind:0"
        assert procmaps.numa_policy(PROC, os.getpid(), never_pinned) == "default"
    finally:
        numa.unmap(mappings[0], result.size)
        numa.unmap(mappings[1], PAGE)
        for fd in fds:
            os.close(fd)


def test_an_existing_file_is_refused_and_left_untouched(mem_dir: Path) -> None:
    existing = mem_dir / "ram-node0"
    existing.write_bytes(b"guest data")

    with pytest.raises(PinError, match="already exists"):
        pin(mem_dir, MiB)

    assert existing.read_bytes() == b"guest data"


def test_a_symlink_in_place_of_the_file_is_refused_and_its_target_untouched(mem_dir: Path,
                                                                          tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"host file")
    (mem_dir / "ram-node0").symlink_to(target)

    with pytest.raises(PinError, match="already exists"):
        pin(mem_dir, MiB)

    assert target.read_bytes() == b"host file"
    assert (mem_dir / "ram-node0").is_symlink()


def test_a_symlinked_directory_is_refused(mem_dir: Path, tmp_path: Path) -> None:
    link = tmp_path / "linkdir"
    link.symlink_to(mem_dir)

    with pytest.raises(PinError, match="cannot open memory directory"):
        pin(link, MiB)

    assert os.listdir(mem_dir) == []


@pytest.mark.parametrize(("size", "page_size"), [(MiB + 1, PAGE), (3 * MiB, 2 * MiB), (0, PAGE)])
def test_a_size_that_is_not_a_whole_number_of_pages_is_refused(mem_dir: Path, size: int,
                                                               page_size: int) -> None:
    with pytest.raises(PinError, match="page size") as caught:
        pin(mem_dir, size, page_size=page_size)

    assert "dmem-libvirt: cannot pin" in caught.value.line()
    assert os.listdir(mem_dir) == []


def test_a_pool_too_small_gives_one_line_naming_node_and_size_and_leaves_no_file(small_dir: Path) -> None:
    with pytest.raises(PinError) as caught:
        pin(small_dir, 16 * MiB, fill=fill_pattern(DIRTY))

    line = caught.value.line()
    assert "host node 0" in line
    assert "16.0 MiB" in line
    assert str(small_dir / "ram-node0") in line
    assert "\n" not in line
    assert os.listdir(small_dir) == []
    assert used_bytes(small_dir) == 0


def test_binding_to_a_node_that_does_not_exist_fails_and_leaves_no_file(mem_dir: Path) -> None:
    with pytest.raises(PinError, match="host node 1000"):
        pin_file(mem_dir, "ram-node0", MiB, 1000, page_size=PAGE, uid=QEMU_UID, gid=QEMU_GID)

    assert os.listdir(mem_dir) == []


def test_a_failing_fill_leaves_no_file(mem_dir: Path) -> None:
    def broken(address: int, length: int) -> None:
        raise RuntimeError("backend lost its counters")

    with pytest.raises(PinError, match="backend lost its counters"):
        pin(mem_dir, MiB, fill=broken)

    assert os.listdir(mem_dir) == []
    assert used_bytes(mem_dir) == 0


def test_a_name_with_a_slash_is_refused(mem_dir: Path) -> None:
    with pytest.raises(PinError, match="not a plain file name"):
        pin(mem_dir, MiB, name="../ram-node0")


def test_remove_file_reports_whether_there_was_a_file(mem_dir: Path) -> None:
    pin(mem_dir, MiB)

    assert remove_file(mem_dir, "ram-node0") is True
    assert remove_file(mem_dir, "ram-node0") is False
    assert os.listdir(mem_dir) == []
    assert used_bytes(mem_dir) == 0


def test_remove_file_removes_a_symlink_not_its_target(mem_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"host file")
    (mem_dir / "ram-node0").symlink_to(target)

    assert remove_file(mem_dir, "ram-node0") is True

    assert target.read_bytes() == b"host file"
    assert os.listdir(mem_dir) == []


def test_scan_for_counts_occurrences_across_window_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "data"
    window = 64 * MiB
    # One occurrence straddles the 64 MiB scan window boundary.
    with open(path, "wb") as out:
        out.truncate(window + MiB)
        out.seek(window - 3)
        out.write(DIRTY)
        out.seek(10)
        out.write(DIRTY)

    assert scan_for(path, DIRTY) == 2


def test_zeroing_that_misses_one_page_leaves_the_pattern_for_a_scan_to_find(mem_dir: Path) -> None:
    path = dirty_file(mem_dir, "previous", MiB)
    fd = os.open(path, os.O_RDWR)
    try:
        address = numa.map_shared(fd, MiB)
        try:
            skipped = 100 * 4096
            numa.memset(address, 0, skipped)
            numa.memset(address + skipped + 4096, 0, MiB - skipped - 4096)
        finally:
            numa.unmap(address, MiB)
    finally:
        os.close(fd)

    assert scan_for(path, DIRTY) == 2


@pytest.mark.parametrize("pattern", [b"", b"SEVEN!!", b"X" * 2056])
def test_fill_pattern_refuses_a_pattern_it_cannot_lay_out_per_page(pattern: bytes) -> None:
    with pytest.raises(ValueError, match="fill pattern must be"):
        fill_pattern(pattern)
