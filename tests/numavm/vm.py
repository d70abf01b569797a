"""Boots the two-NUMA-node test VM with QEMU (TCG) and collects the verdicts of the checks run inside.

`run_checks()` makes sure the cached image exists (tests/numavm/image.py), packs the current project tree as
a tar on a second, read-only disk, boots the image with two NUMA nodes (`-numa node` x2, one
memory-backend-ram and one vCPU each) under `-snapshot`, and parses the verdict lines that
tests/numavm/inside.py writes to the VM's second serial port.  TCG, not KVM: this machine's /dev/kvm is PVM,
under which a stock kernel does not boot usefully and `-cpu max` aborts QEMU.
CLI (as root): `python tests/numavm/vm.py image` builds the image, `run [-k NAME]` boots it and prints.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from numavm.image import REPO, SKIP, Image, ImageError, ensure_image
from numavm.inside import ONLY_PARAMETER, PREFIX

QEMU = "qemu-system-x86_64"
NODE_MEMORY_MIB = 1536
# Boot, libvirtd start-up and every check's nested TCG guests; a hung VM is killed after this.
TIMEOUT = 1200.0
CONSOLE_TAIL = 40


@dataclass
class Outcome:
    """What one boot of the VM reported: verdict per check, failure lines, and the console for context."""

    passed: list[str] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)
    expected: list[str] = field(default_factory=list)
    ended: bool = False
    console: str = ""
    stopped: str = ""
    seconds: float = 0.0

    def problem(self, name: str) -> str | None:
        """None when check ``name`` passed; otherwise its own failure lines, or why there is no verdict."""
        if name in self.passed:
            return None
        if name in self.failures:
            return "\n".join(self.failures[name])
        if not self.ended:
            return (f"the VM stopped before reporting {name} ({self.stopped}); the console ends with:\n"
                    + "\n".join(self.console.splitlines()[-CONSOLE_TAIL:]))
        return f"the VM reported no verdict for {name}"


def parse(report: str) -> Outcome:
    outcome = Outcome()
    for line in report.splitlines():
        if not line.startswith(PREFIX + " "):
            continue
        verb, _, rest = line[len(PREFIX) + 1:].rstrip("\r").partition(" ")
        if verb == "START":
            outcome.expected = rest.split()
        elif verb == "PASS":
            outcome.passed.append(rest)
        elif verb == "FAIL":
            name, _, text = rest.partition(": ")
            outcome.failures.setdefault(name, []).append(text)
        elif verb == "END":
            outcome.ended = True
    return outcome


def project_tar(target: Path) -> None:
    """The project tree (what the image's editable install points at), as a tar padded to whole sectors."""
    skip = set(SKIP)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if any(part in skip or part.endswith(".egg-info") for part in parts):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(target, "w", format=tarfile.GNU_FORMAT) as tar:
        for entry in sorted(REPO.iterdir()):
            tar.add(entry, arcname=entry.name, filter=keep)
    # A disk is read in 512-byte sectors; tar's own records are already multiples of that.
    size = target.stat().st_size
    if size % 512:
        with target.open("ab") as handle:
            handle.write(b"\0" * (512 - size % 512))


def qemu_argv(image: Image, project: Path, console: Path, report: Path, only: str | None = None) -> list[str]:
    nodes = []
    for node in (0, 1):
        nodes += ["-object", f"memory-backend-ram,id=m{node},size={NODE_MEMORY_MIB}M",
                  "-numa", f"node,nodeid={node},cpus={node},memdev=m{node}"]
    return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", f"{2 * NODE_MEMORY_MIB}M",
            *nodes, "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            # No udev in the VM, and no KVM module either: the nested guests are TCG like the VM.
            "-append", "root=/dev/vda rw console=ttyS0 init=/sbin/numavm-init panic=-1 quiet "
                       "modprobe.blacklist=kvm,kvm_intel,kvm_amd" + (f" {ONLY_PARAMETER}={only}" if only else ""),
            "-drive", f"file={image.disk},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={project},if=virtio,format=raw,readonly=on",
            "-serial", f"file:{console}", "-serial", f"file:{report}",
            "-display", "none", "-monitor", "none", "-nodefaults", "-no-reboot", "-net", "none"]


def run_checks(only: str | None = None, timeout: float = TIMEOUT, console_copy: Path | None = None) -> Outcome:
    """Boot the VM once, run the checks inside (of section ``only``, or all), return what it said."""
    image, _ = ensure_image()
    with tempfile.TemporaryDirectory(prefix="numavm-") as tmp:
        work = Path(tmp)
        project_tar(work / "project.tar")
        console, report = work / "console.log", work / "report.log"
        started = time.monotonic()
        argv = qemu_argv(image, work / "project.tar", console, report, only)
        try:
            qemu = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, check=False)
            stopped = f"QEMU exited {qemu.returncode} {qemu.stderr.strip()}".strip()
        except subprocess.TimeoutExpired:
            stopped = f"the VM was killed after {timeout:.0f} s"
        outcome = parse(report.read_text(errors="replace") if report.exists() else "")
        outcome.stopped = stopped
        outcome.console = console.read_text(errors="replace") if console.exists() else ""
        if console_copy is not None:
            console_copy.write_text(outcome.console)
        outcome.seconds = time.monotonic() - started
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/numavm/vm.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("image", help="build the VM image unless the cache holds it; print its directory")
    run = sub.add_parser("run", help="boot the VM, run the checks, print each verdict")
    run.add_argument("-k", dest="only", metavar="SECTION", help="only the section named TEXT")
    run.add_argument("--console", type=Path, metavar="FILE", help="keep the VM's console output in FILE")
    args = parser.parse_args(argv)
    try:
        if args.command == "image":
            started = time.monotonic()
            image, built = ensure_image(log=None)
            verb = f"built in {time.monotonic() - started:.0f} s" if built else "cached"
            print(f"numa-vm image {verb}: {image.directory}")
            return 0
        outcome = run_checks(args.only, console_copy=args.console)
    except ImageError as err:
        print(f"numa-vm: {err}", file=sys.stderr)
        return 1
    names = outcome.expected or [*outcome.passed, *outcome.failures]
    failed = 0
    for name in names:
        problem = outcome.problem(name)
        print(f"{'PASS' if problem is None else 'FAIL'} {name}")
        if problem is not None:
            failed += 1
            print("\n".join(f"    {line}" for line in problem.splitlines()))
    print(f"{len(names) - failed} passed, {failed} failed, VM ran {outcome.seconds:.0f} s")
    return 1 if failed or not names else 0


if __name__ == "__main__":
    sys.exit(main())
