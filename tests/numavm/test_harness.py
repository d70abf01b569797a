"""The host side of the two-node VM harness, without booting it: verdicts read back, mirror found."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .image import UNUSED_DAYS, Image, ImageError, debian_mirror, prune
from .vm import parse

REPORT = """\
numavm: START vm/two_numa_nodes dmemfs/a dmemfs/b dmemfs/c
numavm: PASS vm/two_numa_nodes
numavm: FAIL dmemfs/a: spread: ram-node1 should have 128 MiB on node 1, numa_maps show {0: '128 MiB'}
numavm: FAIL dmemfs/a: second line
numavm: PASS dmemfs/b\r
"""


def test_a_failed_check_shows_the_vms_own_lines() -> None:
    outcome = parse(REPORT)
    assert outcome.expected == ["vm/two_numa_nodes", "dmemfs/a", "dmemfs/b", "dmemfs/c"]
    assert outcome.problem("vm/two_numa_nodes") is None
    assert outcome.problem("dmemfs/b") is None
    assert outcome.problem("dmemfs/a") == ("spread: ram-node1 should have 128 MiB on node 1, numa_maps show "
                                           "{0: '128 MiB'}\nsecond line")


def test_a_check_without_verdict_shows_how_the_vm_stopped_and_its_console() -> None:
    outcome = parse(REPORT)
    outcome.stopped = "the VM was killed after 900 s"
    outcome.console = "\n".join(f"line {i}" for i in range(100))
    problem = outcome.problem("dmemfs/c")
    assert problem is not None
    assert "before reporting dmemfs/c (the VM was killed after 900 s)" in problem
    assert problem.endswith("line 98\nline 99") and "line 59" not in problem


def test_a_check_missing_after_the_end_is_named() -> None:
    outcome = parse(REPORT + "numavm: END\n")
    assert outcome.problem("dmemfs/c") == "the VM reported no verdict for dmemfs/c"


def test_the_debian_mirror_comes_from_apt_sources_of_either_format(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("# deb http://old.example/debian bookworm main\n"
                                           "deb [arch=amd64] https://packages.example/apt stable main\n")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n")
    assert debian_mirror((tmp_path / "sources.list", parts)) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb http://one.example/debian bookworm main\n")
    assert debian_mirror((tmp_path / "sources.list", parts)) == "http://one.example/debian"


def test_no_debian_source_is_an_error_naming_the_files(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb https://packages.example/apt stable main\n")
    with pytest.raises(ImageError, match=r"no apt source serves Debian bookworm in .*sources\.list"):
        debian_mirror((tmp_path / "sources.list",))


def test_prune_removes_only_other_images_unused_for_a_week(tmp_path: Path) -> None:
    images = {name: Image(tmp_path / name) for name in ("current", "recent", "stale")}
    for image in images.values():
        image.directory.mkdir()
        image.ready.write_text("key\n")
    week_ago = time.time() - (UNUSED_DAYS + 1) * 86400
    for name in ("current", "stale"):
        os.utime(images[name].ready, (week_ago, week_ago))
    assert prune(tmp_path, keep=images["current"]) == [images["stale"].directory]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "recent"]
