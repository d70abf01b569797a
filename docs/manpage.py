"""Generate the dmem-libvirt(8) manual page from the command's own argparse definitions.

`python docs/manpage.py > dmem-libvirt.8` (the Debian package does this at build time): every command,
option and example in the page is the one `dmem-libvirt --help` shows, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmem_libvirt import __version__, cli, config

FILES = (
    (str(config.DEFAULT_PATH), "The configuration (TOML); the hook reads only this path."),
    ("/var/lib/dmem-libvirt/ledger.json", "The reservation ledger: which guest holds how much memory where."),
    ("/var/lib/dmem-libvirt/counters.json", "Admissions, refusals and hook failures since boot (see metrics)."),
    (f"/var/lib/dmem-libvirt/{config.EMULATED_COUNTERS}/",
     "The emulated dmemfs counters, when [dmemfs] emulate is set and no [dmemfs] debugfs is named."),
    ("/etc/libvirt/hooks/qemu.d/50-dmem-libvirt",
     "The libvirt QEMU hook that admits, pins and releases guest memory."),
)


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes and hyphens escaped, no leading control character."""
    escaped = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + escaped if escaped[:1] in (".", "'") else escaped


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> list[str]:
    lines = []
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or "-h" in action.option_strings or action.dest in skip:
            continue
        if action.option_strings:
            flags = ", ".join(f"\\fB{roff(flag)}\\fR" for flag in action.option_strings)
            if action.metavar or action.nargs != 0:
                flags += f" \\fI{roff(str(action.metavar or action.dest.upper()))}\\fR"
        else:
            flags = f"\\fI{roff(str(action.metavar or action.dest))}\\fR"
        lines += [".TP", flags, roff(str(action.help))]
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage: ").split())


def render() -> str:
    parser = cli.build_parser()
    lines = [
        f'.TH DMEM\\-LIBVIRT 8 "" "dmem\\-libvirt {__version__}" "System Administration"',
        ".SH NAME",
        "dmem\\-libvirt, dmem\\-libvirt\\-hook \\- run libvirt/KVM guests on reserved host memory",
        ".SH SYNOPSIS",
        roff(_usage(parser)),
        ".SH DESCRIPTION",
        roff(str(parser.description)),
        "Guest RAM is backed by files on dmemfs (memory reserved at boot, without struct page), placed on a host",
        "NUMA node, admitted or refused before QEMU starts by the libvirt hook, pinned and zeroed when the guest",
        "starts, and given back when it stops.  Errors are one line:",
        ".IP",
        roff("dmem-libvirt: <domain>: <what went wrong, with numbers and units>"),
        ".SH OPTIONS",
        *_options(parser),
        ".SH COMMANDS",
    ]
    for name, sub in _subcommands(parser).items():
        text, example = cli.COMMAND_HELP[name]
        lines += [f".SS {name}", roff(_usage(sub)), ".PP", roff(text), *_options(sub, skip=("config",)),
                  ".PP", "Example:", ".IP", ".nf", roff(example), ".fi"]
    lines += [
        ".SH THE HOOK",
        roff("dmem-libvirt-hook NAME OPERATION SUBOP [EXTRA] < domain.xml"),
        ".PP",
        "is what libvirt runs for every guest operation (through /etc/libvirt/hooks/qemu.d/50\\-dmem\\-libvirt).",
        "It admits or refuses at prepare, pins and zeroes at start, verifies at started, releases at stopped and",
        "release, re-adopts at reconnect and places incoming guests at migrate and restore; a refusal is one line",
        "on stderr, which virsh shows.  Guests without file\\-backed RAM or dmem\\-libvirt metadata pass through.",
        ".SH EXIT STATUS", roff(str(parser.epilog)), ".SH FILES",
    ]
    for path, text in FILES:
        lines += [".TP", f"\\fI{roff(path)}\\fR", roff(text)]
    lines += [".SH SEE ALSO", "\\fBvirsh\\fR(1), \\fBlibvirtd\\fR(8), \\fBvirtqemud\\fR(8)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
