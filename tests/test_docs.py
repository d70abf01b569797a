"""The documentation agrees with the command: the man page is generated from its argparse definitions and
formats without a warning; the README's command table says what `--help` says."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dmem_libvirt import cli

REPO = Path(__file__).resolve().parent.parent


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.fixture(scope="module")
def manpage(tmp_path_factory: pytest.TempPathFactory) -> str:
    result = subprocess.run([sys.executable, str(REPO / "docs" / "manpage.py")], capture_output=True, text=True,
                            check=False, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    return result.stdout


def test_the_man_page_formats_without_a_warning(manpage: str) -> None:
    result = subprocess.run(["groff", "-man", "-ww", "-z"], input=manpage, capture_output=True, text=True,
                            check=False, timeout=60, env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stderr) == (0, "")


def test_the_man_page_documents_every_command_option_and_example(manpage: str) -> None:
    text = manpage.replace("\\-", "-").replace("\\fB", "").replace("\\fI", "").replace("\\fR", "")
    for name, sub in subcommands().items():
        description, example = cli.COMMAND_HELP[name]
        assert f".SS {name}\n" in text
        assert description in text and example in text
        for action in sub._actions:
            for flag in set(action.option_strings) - {"-h", "--help"}:
                assert flag in text, (name, flag)
    assert "--version" in text


def readme_commands() -> dict[str, str]:
    """The README's command table: `dmem-libvirt NAME` -> its one-line description."""
    rows = re.findall(r"^\| `dmem-libvirt ([a-z-]+)[^`]*` \| (.+?) \|$", (REPO / "README.md").read_text(), re.M)
    return dict(rows)


def test_the_readme_lists_every_command_with_the_help_text() -> None:
    assert readme_commands() == {name: text for name, (text, _) in cli.COMMAND_HELP.items()}


def test_every_option_the_readme_gives_a_command_exists() -> None:
    readme = (REPO / "README.md").read_text()
    parsers = subcommands()
    for name, options in re.findall(r"dmem-libvirt ([a-z-]+)((?: [^\n`|#<>]*)?)", readme):
        if name not in parsers:
            continue
        known = {flag for action in parsers[name]._actions for flag in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", options):
            assert flag in known, f"README: dmem-libvirt {name} {flag}"


def test_the_debian_package_version_is_the_programs() -> None:
    from dmem_libvirt import __version__

    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"dmem-libvirt ({__version__}) ")
