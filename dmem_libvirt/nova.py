"""OpenStack Nova: what its domains say about themselves, and what Nova must be told about this host.

Nova's libvirt driver writes a ``<nova:instance>`` element (namespace NOVA_NS) into every domain's
<metadata>: the instance's display name, flavor, owner and image.  `read_instance` reads the name and
flavor (stdlib ElementTree or lxml).  `host_settings` turns the live pools into the nova.conf values and the
provider-config traits that `dmem-libvirt nova-config` prints: Nova reports ``[libvirt]
file_backed_memory`` as the host's MEMORY_MB and requires ``ram_allocation_ratio = 1.0`` with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import runtime
from .errors import DmemError
from .units import MiB, format_page_size, format_size

if TYPE_CHECKING:
    from .backends import Backend
    from .domain import Element

NOVA_NS = "http://openstack.org/xmlns/libvirt/nova/1.1"
TRAIT = "CUSTOM_DMEM"
PROVIDER_SCHEMA_VERSION = "1.0"
# nova-compute reads every *.yaml here at start-up ([compute] provider_config_location).
PROVIDER_CONFIG_DIR = "/etc/nova/provider_config"


@dataclass(frozen=True)
class NovaInstance:
    """Nova's own description of a domain."""

    name: str                          # the instance's display name (the domain is "instance-<id>")
    flavor: str


def read_instance(root: Element) -> NovaInstance | None:
    """The ``<nova:instance>`` metadata of a <domain> element, None when Nova did not define it."""
    instance = root.find(f"metadata/{{{NOVA_NS}}}instance")
    if instance is None:
        return None
    flavor = instance.find(f"{{{NOVA_NS}}}flavor")
    return NovaInstance(
        name=(instance.findtext(f"{{{NOVA_NS}}}name") or "").strip(),
        flavor=(flavor.get("name") or "") if flavor is not None else "",
    )


def running_instances(run_dir: Path) -> dict[str, NovaInstance]:
    """Domain UUID -> Nova's description, for every running domain that Nova defined."""
    found = {}
    for running in runtime.running_domains(run_dir):
        instance = read_instance(running.domain)
        uuid = (running.domain.findtext("uuid") or "").strip()
        if instance is not None and uuid:
            found[uuid] = instance
    return found


@dataclass(frozen=True)
class HostSettings:
    """What Nova must be told about this host."""

    backend: str
    pools: Mapping[int, Mapping[int, int]]   # page size -> node -> pool bytes
    reserve: int                             # pool bytes kept back from Nova
    file_backed_memory_mb: int               # 0: Nova's file-backed memory stays off (hugetlbfs)
    traits: tuple[str, ...]


def page_trait(page_size: int) -> str:
    """The trait for a page size, in the spelling of Nova's hw:mem_page_size: CUSTOM_DMEM_PAGE_2MB."""
    size = format_page_size(page_size).replace(" ", "").upper()
    return f"{TRAIT}_PAGE_{size.removesuffix('IB')}B"


def host_settings(backend: Backend, reserve: int) -> HostSettings:
    """Nova's view of the backend's pools; traits for dmem, for the backend and for each page size.

    On dmemfs the pools' total less ``reserve``, in whole MiB, is Nova's file-backed memory.  On hugetlbfs
    Nova keeps file-backed memory off (it refuses huge pages with it) and counts the pools itself.
    """
    sizes = sorted(backend.page_sizes())
    pools = {size: {node: pool.total for node, pool in sorted(backend.pools(size).items())} for size in sizes}
    # Per backend as well: Nova cannot run the same flavor on both (file-backed memory excludes huge pages).
    traits = (TRAIT, f"{TRAIT}_{backend.name.upper()}", *(page_trait(size) for size in sizes))
    if backend.name == "hugetlbfs":
        return HostSettings(backend.name, pools, 0, 0, traits)
    total = sum(sum(nodes.values()) for nodes in pools.values())
    if total <= 0:
        raise DmemError(f"the {backend.name} pools are empty: nothing to offer Nova")
    offered = total - reserve
    if offered < MiB:
        raise DmemError(f"[nova] reserve {format_size(reserve)} leaves nothing of the {format_size(total)} "
                        f"{backend.name} pools for Nova")
    return HostSettings(backend.name, pools, reserve, offered // MiB, traits)


def nova_conf(settings: HostSettings) -> str:
    """The nova.conf lines for this host."""
    lines = [f"# {settings.backend} pools of {format_page_size(size)} pages: "
             + ", ".join(f"node {node} {format_size(total)}" for node, total in nodes.items())
             for size, nodes in settings.pools.items()]
    if not settings.file_backed_memory_mb:
        return "\n".join([
            *lines,
            "# Nova places hw:mem_page_size guests against each node's pool as libvirt reported it when",
            "# nova-compute started (it keeps the capabilities): allocate the pools at boot and leave",
            "# [hugetlbfs.limit] unset, so that they are used as sized; growth would be invisible to Nova.",
            "[libvirt]",
            "# Nova refuses huge pages together with file-backed memory.",
            "file_backed_memory = 0",
        ]) + "\n"
    if settings.reserve:
        lines.append(f"# less {format_size(settings.reserve)} kept back ([nova] reserve)")
    lines += [
        "[DEFAULT]",
        "# Nova refuses file-backed memory with any other ratio.",
        "ram_allocation_ratio = 1.0",
        "# The host's own RAM is not part of file_backed_memory: nothing of it to reserve.",
        "reserved_host_memory_mb = 0",
        "",
        "[libvirt]",
        f"file_backed_memory = {settings.file_backed_memory_mb}",
    ]
    return "\n".join(lines) + "\n"


def provider_yaml(settings: HostSettings) -> str:
    """A provider config file for PROVIDER_CONFIG_DIR that gives this compute node the traits.

    Written by hand, not with a YAML library: every scalar is single-quoted, which YAML reads verbatim
    for the characters a trait or '$COMPUTE_NODE' can hold.
    """
    lines = [
        "meta:",
        f"  schema_version: '{PROVIDER_SCHEMA_VERSION}'",
        "providers:",
        "  - identification:",
        "      uuid: '$COMPUTE_NODE'",
        "    traits:",
        "      additional:",
    ]
    lines += [f"        - '{trait}'" for trait in settings.traits]
    return "\n".join(lines) + "\n"

