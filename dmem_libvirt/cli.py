"""The ``dmem-libvirt`` command: define-time rewrite, hook installation and operations.

Exit codes: 0 ok, 1 refused or failed (one line on stderr, ``dmem-libvirt: <domain>: ...``), 2 usage.
``main(argv, conn=...)`` takes an injected libvirt connection, so tests drive every command in-process.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import IO, TYPE_CHECKING

from . import __version__
from . import config as config_mod
from .errors import DmemError, HostError
from .units import format_page_size, format_size, parse_size

if TYPE_CHECKING:
    from .define import Plan
    from .domain import DomainMemory
    from .lifecycle import HookContext
    from .placement import NodeRoom
    from .virt import Connection


class Streams:
    def __init__(self, stdin: IO[bytes], stdout: IO[str], stderr: IO[str]) -> None:
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr

    def out(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def err(self, text: str) -> None:
        self.stderr.write(text + "\n")

    def document(self, data: bytes, encoding: str) -> None:
        """An XML document exactly as serialized: bytes through a binary stdout, else decoded text."""
        binary = getattr(self.stdout, "buffer", None)
        if binary is None:
            self.stdout.write(data.decode(encoding))
            return
        # The document carries its own encoding declaration: its bytes must not be re-encoded.
        self.stdout.flush()
        binary.write(data)
        binary.flush()


def _node_list(text: str) -> list[int]:
    try:
        nodes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of host nodes: {text!r} (e.g. 0 or 0,1)") from None
    if any(node < 0 for node in nodes):
        raise argparse.ArgumentTypeError(f"host nodes are not negative: {text!r}")
    return nodes


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# Each command: its one-line description (the same in `dmem-libvirt --help`, its own --help, the man page and
# the README's command table) and an example.
COMMAND_HELP: dict[str, tuple[str, str]] = {
    "rewrite": ("rewrite domain XML from stdin for reserved memory, offline (no libvirt connection)",
                "dmem-libvirt rewrite --nodes 0 --page-size 2M < web01.xml > web01-dmem.xml"),
    "plan": ("show where a defined domain's cells would go and the XML diff; changes nothing",
             "dmem-libvirt plan web01"),
    "enable": ("rewrite a defined domain for reserved memory and define it again",
               "dmem-libvirt enable web01 --nodes 1"),
    "disable": ("restore a domain's original memory definition", "dmem-libvirt disable web01"),
    "status": ("show the pools per host node, the reservations and the domains holding them",
               "dmem-libvirt status --json"),
    "metrics": ("write pools, reservations and hook counters in Prometheus text format",
                "dmem-libvirt metrics --textfile /var/lib/prometheus/node-exporter/dmem_libvirt.prom"),
    "install-hook": ("install the libvirt hook and reload the daemon that runs the QEMU driver",
                     "dmem-libvirt install-hook"),
    "uninstall-hook": ("remove the libvirt hook and reload the daemon that runs the QEMU driver",
                       "dmem-libvirt uninstall-hook"),
    "reconcile": ("adopt running guests the ledger lost; free reservations no live guest owns",
                  "dmem-libvirt reconcile --dry-run"),
    "check": ("verify the installation; print each finding with its fix", "dmem-libvirt check"),
    "nova-config": ("print the nova.conf lines and provider config YAML for this host's pools",
                    "dmem-libvirt nova-config --reserve 4G"),
    "hook-server": ("run hook calls in children of one resident process (the hook falls back without it)",
                    "dmem-libvirt hook-server   # or: systemctl enable --now dmem-libvirt-hook-server"),
}


def _config_option(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("--config", metavar="FILE", default=default,
                   help=f"config file (default: ${config_mod.ENV_VAR} or {config_mod.DEFAULT_PATH})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmem-libvirt", description="Run libvirt guests on reserved host memory (dmemfs).",
        epilog="exit status: 0 done, 1 refused or failed (one line on stderr), 2 usage error")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _config_option(parser, None)
    # Also accepted after the command (`rewrite --config FILE`); SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _config_option(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        text, example = COMMAND_HELP[name]
        return sub.add_parser(name, parents=[common], help=text, description=text,
                              epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--connect", metavar="URI", help="libvirt URI (default: libvirt's)")

    def placement(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nodes", type=_node_list, metavar="LIST",
                       help="host node for all cells (N) or one per guest cell (N,M,...)")
        p.add_argument("--page-size", type=_size, metavar="SIZE",
                       help="dmem page size, e.g. 2M (default: the host's)")
        p.add_argument("--round", action="store_true", dest="round_up",
                       help="round cell sizes up to whole pages instead of refusing")

    placement(command("rewrite"))
    for name in ("plan", "enable", "disable"):
        p = command(name)
        p.add_argument("domain", help="name of a defined libvirt domain")
        connection(p)
        if name != "disable":
            placement(p)
    command("status").add_argument("--json", action="store_true", help="machine-readable output")
    command("metrics").add_argument(
        "--textfile", type=Path, metavar="FILE",
        help="replace FILE atomically (node_exporter's textfile collector reads *.prom); default: stdout")
    for name in ("install-hook", "uninstall-hook"):
        command(name).add_argument(
            "--hooks-dir", type=Path, metavar="DIR",
            help="libvirt's hooks directory (default: [libvirt] hooks_dir, /etc/libvirt/hooks)")
    command("reconcile").add_argument("--dry-run", action="store_true",
                                      help="print what would be adopted or freed and why; change nothing")
    command("check")
    p = command("nova-config")
    p.add_argument("--reserve", type=_size, metavar="SIZE",
                   help="pool memory kept back from Nova (default: [nova] reserve, 0)")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--conf", action="store_true", help="print only the nova.conf lines")
    only.add_argument("--provider-yaml", action="store_true", help="print only the provider config YAML")
    command("hook-server").add_argument(
        "--socket", type=Path, metavar="PATH",
        help="listen there instead of /run/dmem-libvirt/hook.sock, the only place the hook asks (for tests)")
    return parser


def main(argv: Sequence[str] | None = None, conn: Connection | None = None, *,
         stdin: IO[bytes] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    io = Streams(stdin or sys.stdin.buffer, stdout or sys.stdout, stderr or sys.stderr)
    parser = build_parser()
    try:
        # argparse prints usage errors and --help itself: send them to the streams we were given.
        with redirect_stdout(io.stdout), redirect_stderr(io.stderr):
            args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        config = config_mod.load(config_mod.resolve_path(args.config))
        return COMMANDS[args.command](args, config, conn, io)
    except DmemError as err:
        domain = getattr(args, "domain", None)
        io.err((err.for_domain(domain) if domain else err).line())
        return 1
    except OSError as err:
        # A host file failing where no module expected it (permissions, a full disk): still one line.
        where = f": {err.filename}" if err.filename else ""
        io.err(DmemError(f"{args.command} failed: {err.strerror or err}{where}", getattr(args, "domain", None)).line())
        return 1


def _context(config: config_mod.Config) -> HookContext:
    from .lifecycle import HookContext

    return HookContext.create(config)


def _plan(args: argparse.Namespace, config: config_mod.Config, xml: bytes) -> Plan:
    from . import define, domxml
    from .domain import read_domain

    # Hostile or malformed XML is refused before anything on the host is read.
    dom = read_domain(domxml.parse(xml).getroot())
    try:
        ctx = _context(config)
        page = args.page_size or _host_page_size(ctx, dom)
        rooms: list[NodeRoom] | None
        try:
            # Define time only advises: a damaged ledger still tells what it can (the hook decides).
            rooms = ctx.rooms(ctx.ledger.snapshot()[0], except_uuid=dom.uuid, page_size=page)
        except HostError as err:
            if not args.nodes:
                raise HostError(f"{err.message}; or give the host nodes with --nodes") from None
            rooms = None
        return define.plan(xml, page_size=page, rooms=rooms, backend=ctx.backend.name,
                           nodes=args.nodes, round_up=args.round_up)
    except DmemError as err:
        raise err.for_domain(dom.name) from None


def _host_page_size(ctx: HookContext, dom: DomainMemory) -> int:
    try:
        return ctx.backend.page_size_for(dom)
    except HostError as err:
        raise HostError(f"{err.message}; or give the page size with --page-size") from None


def cmd_rewrite(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None, io: Streams) -> int:
    xml = io.stdin.read()
    plan = _plan(args, config, xml)
    for warning in plan.warnings:
        io.err(f"dmem-libvirt: {plan.name}: warning: {warning}")
    io.document(plan.rewritten, plan.encoding)
    return 0


def _connection(args: argparse.Namespace, conn: Connection | None) -> Connection:
    from .virt import connect

    return conn if conn is not None else connect(args.connect)


def _domain_xml(args: argparse.Namespace, conn: Connection | None) -> tuple[Connection, bytes, bool]:
    from . import virt

    connection = _connection(args, conn)
    handle = virt.lookup(connection, args.domain)
    return connection, virt.inactive_xml(handle).encode(), bool(handle.isActive())


def placement_table(plan: Plan) -> list[str]:
    rooms = {room.node: room for room in plan.rooms}
    lines = [f"{plan.name}: {format_page_size(plan.page_size)} {plan.kind} pages",
             f"{'CELL':>4}  {'SIZE':>11}  {'NODE':>4}  {'NODE FREE':>11}  RESERVED BY OTHERS"]
    for need in plan.needs:
        node = plan.placement[need.cell]
        room = rooms.get(node)
        free = format_size(room.free) if room else "-"
        held = ", ".join(f"{format_size(size)} by {dom}" for dom, size in room.reserved) if room else ""
        lines.append(f"{need.cell:>4}  {format_size(need.size):>11}  {node:>4}  {free:>11}  {held or '-'}")
    return lines


def cmd_plan(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None, io: Streams) -> int:
    from . import domxml

    _, xml, _ = _domain_xml(args, conn)
    plan = _plan(args, config, xml)
    for line in placement_table(plan):
        io.out(line)
    for warning in plan.warnings:
        io.out(f"warning: {warning}")
    # libvirt writes attributes in single quotes, lxml in double: compare like with like.
    before = domxml.serialize(domxml.parse(plan.original))
    diff = difflib.unified_diff(before.decode().splitlines(keepends=True),
                                plan.rewritten.decode().splitlines(keepends=True),
                                f"{plan.name} (defined)", f"{plan.name} (enabled)")
    text = "".join(diff)
    io.out()
    io.stdout.write(text if text else "no change\n")
    return 0


def cmd_enable(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None, io: Streams) -> int:
    from . import virt

    connection, xml, active = _domain_xml(args, conn)
    plan = _plan(args, config, xml)
    for warning in plan.warnings:
        io.err(f"dmem-libvirt: {plan.name}: warning: {warning}")
    cells = ", ".join(f"cell {need.cell} {format_size(need.size)} -> node {plan.placement[need.cell]}"
                      for need in plan.needs)
    if not plan.changed:
        io.out(f"{plan.name}: already enabled ({cells})")
        return 0
    virt.define(connection, plan.name, plan.rewritten.decode())
    later = "; takes effect at the next start" if active else ""
    io.out(f"{plan.name}: enabled on {format_page_size(plan.page_size)} {plan.kind} pages ({cells}){later}")
    return 0


def cmd_disable(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None, io: Streams) -> int:
    from . import define, virt

    connection, xml, active = _domain_xml(args, conn)
    name, restored = define.undo(xml)
    if restored is None:
        io.out(f"{name}: not enabled, nothing to do")
        return 0
    virt.define(connection, name, restored.decode())
    later = "; takes effect at the next start" if active else ""
    io.out(f"{name}: disabled, original memory definition restored{later}")
    return 0


def cmd_status(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None, io: Streams) -> int:
    from . import status

    data = status.collect(_context(config))
    warning = status.damage_warning(data)
    if warning:
        io.err(warning)
    if args.json:
        io.out(json.dumps(data, indent=2, sort_keys=True))
    else:
        io.out(status.render(data))
    return 0


def cmd_metrics(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None, io: Streams) -> int:
    from . import metrics, status

    text = metrics.render(status.collect(_context(config)))
    if args.textfile is None:
        io.stdout.write(text)
    else:
        metrics.write_textfile(args.textfile, text)
    return 0


def cmd_install_hook(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None,
                     io: Streams) -> int:
    from . import install

    hooks_dir = args.hooks_dir or config.libvirt.hooks_dir
    if args.command == "install-hook":
        path = install.install_hook(hooks_dir)
        io.out(f"installed {path}")
    else:
        removed = install.uninstall_hook(hooks_dir)
        io.out(f"removed {removed}" if removed else f"no hook at {install.hook_path(hooks_dir)}")
        if removed is None:
            return 0
    io.out(install.reload_daemon(config.libvirt.run_dir, config.host.proc, config.state.dir))
    return 0


def cmd_reconcile(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None,
                  io: Streams) -> int:
    from . import status

    done = status.reconcile(_context(config), dry_run=args.dry_run)
    for line in done:
        io.out(line)
    if not done:
        io.out("nothing to do: every reservation belongs to a live guest or is within the grace period")
    return 0


def cmd_check(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None, io: Streams) -> int:
    from . import status

    findings = status.check(_context(config))
    for finding in findings:
        io.out(f"{'ok  ' if finding.ok else 'FAIL'}  {finding.what}")
        if not finding.ok and finding.fix:
            io.out(f"      fix: {finding.fix}")
    return 0 if all(finding.ok for finding in findings) else 1


def cmd_nova_config(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None,
                    io: Streams) -> int:
    from . import nova

    backend = _context(config).backend
    reserve = config.nova.reserve if args.reserve is None else args.reserve
    settings = nova.host_settings(backend, reserve)
    if not args.provider_yaml:
        if not args.conf:
            io.out("# ---- /etc/nova/nova.conf (merge into its sections) ----")
        io.stdout.write(nova.nova_conf(settings))
    if not args.conf:
        if not args.provider_yaml:
            io.out("")
            io.out(f"# ---- {nova.PROVIDER_CONFIG_DIR}/dmem-libvirt.yaml ----")
        io.stdout.write(nova.provider_yaml(settings))
    return 0


def cmd_hook_server(args: argparse.Namespace, config: config_mod.Config, conn: Connection | None,
                    io: Streams) -> int:
    from . import hookserver

    return hookserver.serve(args.socket or hookserver.SOCKET)


COMMANDS = {
    "rewrite": cmd_rewrite,
    "plan": cmd_plan,
    "enable": cmd_enable,
    "disable": cmd_disable,
    "status": cmd_status,
    "metrics": cmd_metrics,
    "install-hook": cmd_install_hook,
    "uninstall-hook": cmd_install_hook,
    "reconcile": cmd_reconcile,
    "check": cmd_check,
    "nova-config": cmd_nova_config,
    "hook-server": cmd_hook_server,
}
