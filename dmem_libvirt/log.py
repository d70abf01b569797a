"""Decision log: every admit, refuse, pin, unpin, adopt and orphan freed goes to syslog with numbers.

journald picks syslog up.  stderr is reserved for the one line a user must see, which callers
print themselves; this module never writes there.
"""

from __future__ import annotations

import syslog

_opened = False


def _open() -> None:
    global _opened
    if not _opened:
        syslog.openlog("dmem-libvirt", syslog.LOG_PID, syslog.LOG_DAEMON)
        _opened = True


def event(action: str, domain: str | None = None, **details: object) -> None:
    """Log one decision: ``event("admit", "web01", node=0, bytes=...)``."""
    _open()
    parts = [action]
    if domain:
        parts.append(f"domain={domain}")
    parts.extend(f"{key}={value}" for key, value in details.items())
    syslog.syslog(syslog.LOG_INFO, " ".join(parts))


def warning(message: str, domain: str | None = None) -> None:
    """Log something that went wrong but did not fail the operation."""
    _open()
    prefix = f"{domain}: " if domain else ""
    syslog.syslog(syslog.LOG_WARNING, prefix + message)
