"""The libvirt QEMU hook: ``NAME OPERATION SUBOP EXTRA`` in argv, the domain XML on stdin.

libvirt runs it for every guest operation and waits for it, so a guest that is not ours costs one
read of stdin and a byte search (plus a stdlib parse if it has <memoryBacking> but no file-backed
RAM): neither lxml nor the lifecycle is imported on that path.  A failing ``prepare``,
``start``, ``started``, ``migrate`` or ``restore`` prints one line on stderr (libvirt shows it to the
user) and exits 1; ``stopped``, ``release`` and ``reconnect`` always exit 0 (libvirt ignores the former
and kills the guest on the latter), logging what they could not do.  Only ``migrate``/``restore`` write
to stdout: the XML with this host's placement, or nothing when it does not change.
"""

from __future__ import annotations

import sys

from . import XMLNS, may_concern_us

# typing.TYPE_CHECKING without importing typing (mypy treats the name alike): this module and the
# package are all that a call for a guest that is not ours imports.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO

    from .config import Config
    from .lifecycle import HookContext

# (operation, sub-operation) -> handler name in lifecycle; anything else exits 0 at once.
OPERATIONS = {
    ("prepare", "begin"): "prepare",
    ("start", "begin"): "start",
    ("started", "begin"): "started",
    ("stopped", "end"): "release",
    ("release", "end"): "release",
    ("reconnect", "begin"): "reconnect",
    ("migrate", "begin"): "migrate",
    ("restore", "begin"): "restore",
}
NEVER_FAIL = frozenset({"release", "reconnect"})


def main(argv: list[str], stdin: IO[bytes], stdout: IO[str], stderr: IO[str], *,
         context: HookContext | None = None) -> int:
    """Run one hook call; returns the exit status libvirt will see."""
    if len(argv) < 3:
        stderr.write("usage: dmem-libvirt-hook NAME OPERATION SUBOP [EXTRA] < domain.xml\n")
        return 2
    from .xmlsafe import MAX_XML_BYTES

    name, operation, subop = argv[1], argv[2], argv[3] if len(argv) > 3 else "-"
    handler = OPERATIONS.get((operation, subop))
    # Bounded: one byte past the limit is enough to refuse the document.
    xml = stdin.read(MAX_XML_BYTES + 1)
    if handler is None:
        return 0
    # Defined in the package itself: the domain model would import re, dataclasses, typing (~19 ms).
    if not may_concern_us(xml):
        return 0
    return _dispatch(handler, name, xml, stdout, stderr, context)


def _dispatch(handler: str, name: str, xml: bytes, stdout: IO[str], stderr: IO[str],
              context: HookContext | None) -> int:
    from . import log
    from .errors import DmemError

    try:
        return _run(handler, name, xml, stdout, context)
    except DmemError as err:
        err.for_domain(name)
        if handler in NEVER_FAIL:
            log.warning(f"{handler} could not complete: {err.message}", name)
            _count(context, "hook_failures", handler)
            return 0
        log.event("refuse", name, operation=handler, reason=err.message)
        _count(context, "refusals", err.reason)
        stderr.write(err.line() + "\n")
        return 1
    except Exception as err:
        log.warning(f"{handler} failed: {type(err).__name__}: {err}", name)
        _count(context, "hook_failures", handler)
        if handler in NEVER_FAIL:
            return 0
        stderr.write(f"dmem-libvirt: {name}: internal error in {handler}: {type(err).__name__}: {err}\n")
        return 1


def _count(context: HookContext | None, family: str, label: str) -> None:
    """Count a refusal or failure; the context may be what failed to build, so build a fresh one."""
    from . import log

    try:
        if context is None:
            from . import lifecycle
            from .config import load

            context = lifecycle.HookContext.create(load())
        context.count(family, label)
    except Exception as err:
        # The user's line matters more than the count: never let counting replace it.
        log.warning(f"cannot count {family} {label}: {type(err).__name__}: {err}")


def _run(handler: str, name: str, xml: bytes, stdout: IO[str], context: HookContext | None) -> int:
    # A guest that is not ours must never be failed because this reader is stricter than libvirt.
    ours = XMLNS.encode() in xml
    config: Config | None = None
    if handler == "release" and ours:
        # Checked before parsing the XML and importing the lifecycle: libvirt releases twice per stop.
        config = _config(context)
        if _released(xml, config):
            return 0

    import xml.etree.ElementTree as ET

    from .domain import read_domain
    from .errors import DmemError, DomainXMLError
    from .xmlsafe import parse_stdlib, refusal

    try:
        refused = refusal(xml)
        if refused:
            raise ValueError(refused)
        root = parse_stdlib(xml)
    except (ET.ParseError, ValueError) as err:
        if not ours:
            return 0
        if isinstance(err, ET.ParseError):
            raise DomainXMLError(f"libvirt passed unreadable domain XML: {err}", name) from None
        raise DomainXMLError(str(err), name) from None
    try:
        dom = read_domain(root)
    except DmemError:
        if not ours:
            return 0
        raise
    if dom.metadata is None and not dom.file_backed:
        # Neither placed by us nor able to put its RAM on our filesystem: nothing to check or undo,
        # and nothing heavier than the stdlib parser was imported; unless it is a <hugepages> guest
        # that the configuration has the hugetlbfs backend admit.
        if not dom.hugepages:
            return 0
        config = config or _config(context)
        if config.adopt.hugepages != "admit" or config.backend_name != "hugetlbfs":
            return 0
    if handler == "release" and not ours:
        # An adopted guest (file-backed or <hugepages> without our metadata, as Nova defines them) is
        # released twice per stop as well: the second call finds the ledger without it.
        config = config or _config(context)
        if _released(xml, config):
            return 0
    from . import lifecycle

    ctx = context or lifecycle.HookContext.create(config or _config(None))
    if dom.metadata is None and handler in ("prepare", "start", "started", "reconnect"):
        from .adopt import for_operation

        dom = for_operation(ctx, root, dom, handler)
    if handler in ("migrate", "restore"):
        changed = lifecycle.incoming(ctx, name, xml, handler)
        if changed is not None:
            stdout.write(changed.decode())
        return 0
    if handler == "prepare":
        lifecycle.prepare(ctx, name, dom)
    elif handler == "start":
        lifecycle.start(ctx, name, dom, root.get("id"))
    elif handler == "started":
        lifecycle.started(ctx, name, dom)
    elif handler == "release":
        lifecycle.release(ctx, name, dom)
    elif handler == "reconnect":
        lifecycle.reconnect(ctx, name, dom, root.get("id"))
    return 0


def _config(context: HookContext | None) -> Config:
    """The context's config, else the one the hook reads (imported only when a call needs it)."""
    if context is not None:
        return context.config
    from .config import load

    return load()


def _released(xml: bytes, config: Config) -> bool:
    """True when the ledger surely holds nothing of this domain (its first <uuid>, in libvirt's canonical form)."""
    start = xml.find(b"<uuid>")
    end = xml.find(b"</uuid>", start)
    if start < 0 or end < 0:
        return False
    uuid = xml[start + len(b"<uuid>"):end]
    if len(uuid) != 36 or uuid.strip(b"0123456789abcdef-"):
        return False
    from .ledgerfile import may_hold

    return not may_hold(config.state.dir, uuid.decode())


def entry(xml: bytes | None = None) -> int:
    """Console-script entry point; the hook script passes the XML it already read from stdin."""
    import io

    stdin = sys.stdin.buffer if xml is None else io.BytesIO(xml)
    return main(sys.argv, stdin, sys.stdout, sys.stderr)
