"""One exception hierarchy; every error renders as the single line the user sees.

Format (a contract other tools grep for):
``dmem-libvirt: <domain>: <what went wrong, with numbers and units>``; errors that
concern no domain drop the middle part.
"""

from __future__ import annotations


class DmemError(Exception):
    """Base of every error the program reports to the user."""

    # The reason class a refusal is counted under (counters, metrics); each subclass names its own.
    reason = "other"

    def __init__(self, message: str, domain: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.domain = domain

    def for_domain(self, domain: str) -> DmemError:
        """Attach the domain name if the raiser did not know it."""
        if self.domain is None:
            self.domain = domain
        return self

    def line(self) -> str:
        """The one line printed on stderr."""
        text = " ".join(self.message.split())
        if self.domain:
            return f"dmem-libvirt: {self.domain}: {text}"
        return f"dmem-libvirt: {text}"

    def __str__(self) -> str:
        return self.line()


class ConfigError(DmemError):
    """The configuration file is missing a value, has an unknown key or a bad value."""

    reason = "config"


class HostError(DmemError):
    """A host file (sysfs, debugfs, qemu.conf, /proc) is missing or malformed."""

    reason = "host"


class DomainXMLError(DmemError):
    """The domain XML is malformed, hostile, or asks for something we cannot back."""

    reason = "domain_xml"


class PlacementError(DmemError):
    """No host node (or set of nodes) has room for the guest's cells."""

    reason = "placement"


class LedgerError(DmemError):
    """The reservation ledger cannot be read or written."""

    reason = "ledger"


class LockTimeout(DmemError):
    """The host-wide lock stayed busy longer than [state] lock_timeout."""

    reason = "lock_timeout"


class PinError(DmemError):
    """Creating, sizing, binding or zeroing a backing file failed."""

    reason = "pin"


class LibvirtError(DmemError):
    """libvirt refused a request or could not be reached."""

    reason = "libvirt"


# Every reason class, in the order reports list them.
ERROR_REASONS = ("placement", "domain_xml", "pin", "host", "config", "ledger", "lock_timeout", "libvirt", "other")
