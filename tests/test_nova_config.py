"""`dmem-libvirt nova-config`: what Nova is told about this host, checked the way Nova checks it.

The provider config YAML is validated against tests/data/nova/provider-config-schema-1.0.json, the schema of
Nova's provider-config documentation written out as JSON, then against the checks nova-compute makes after the
schema (only CUSTOM_ traits).  The nova.conf lines are read with configparser, as oslo.config reads INI.
"""

from __future__ import annotations

import configparser
import io
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from fakehost import FakeNode, make_host
from fakehuge import make_huge_host

from dmem_libvirt import cli
from dmem_libvirt.units import GiB, MiB

SCHEMA = json.loads((Path(__file__).parent / "data" / "nova" / "provider-config-schema-1.0.json").read_text())


def nova_config(config_path: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["nova-config", "--config", str(config_path), *args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """Two nodes: 8 GiB and 6 GiB of 2 MiB dmem pages."""
    config = make_host(tmp_path, {0: FakeNode(dmem_total=8 * GiB), 1: FakeNode(dmem_total=6 * GiB)})
    assert config.source is not None
    return config.source


def conf_of(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    return parser


def test_provider_yaml_is_valid_for_nova_and_gives_every_compute_node_the_traits(host: Path) -> None:
    code, out, err = nova_config(host, "--provider-yaml")
    assert (code, err) == (0, "")
    document = yaml.safe_load(out)
    jsonschema.validate(document, SCHEMA)
    assert document["meta"]["schema_version"] == "1.0"
    [provider] = document["providers"]
    assert provider["identification"] == {"uuid": "$COMPUTE_NODE"}
    traits = provider["traits"]["additional"]
    assert traits == ["CUSTOM_DMEM", "CUSTOM_DMEM_DMEMFS", "CUSTOM_DMEM_PAGE_2MB"]
    # nova-compute refuses to start on a trait that is not custom.
    assert all(trait.startswith("CUSTOM_") for trait in traits)


def test_schema_refuses_what_nova_would_refuse() -> None:
    good = {"meta": {"schema_version": "1.0"},
            "providers": [{"identification": {"uuid": "$COMPUTE_NODE"}, "traits": {"additional": ["CUSTOM_DMEM"]}}]}
    jsonschema.validate(good, SCHEMA)
    bad = [
        {"providers": good["providers"]},
        {"meta": {"schema_version": "2.0"}, "providers": good["providers"]},
        {"meta": good["meta"], "providers": [{"identification": {"uuid": "$COMPUTE_NODE"},
                                              "traits": {"additional": ["custom_dmem"]}}]},
        {"meta": good["meta"], "providers": [{"identification": {"uuid": "$COMPUTE_NODE", "name": "x"}}]},
        {"meta": good["meta"], "providers": [{"identification": {"uuid": "compute-1"}}]},
    ]
    for document in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(document, SCHEMA)


def test_nova_conf_offers_the_whole_pool_with_no_overcommit(host: Path) -> None:
    code, out, _ = nova_config(host, "--conf")
    assert code == 0
    conf = conf_of(out)
    assert conf.getint("libvirt", "file_backed_memory") == 14 * GiB // MiB
    assert conf.getfloat("DEFAULT", "ram_allocation_ratio") == 1.0
    assert conf.getint("DEFAULT", "reserved_host_memory_mb") == 0


def test_reserve_is_subtracted_from_what_nova_may_place(host: Path) -> None:
    _, out, _ = nova_config(host, "--conf", "--reserve", "2G")
    conf = conf_of(out)
    assert conf.getint("libvirt", "file_backed_memory") == 12 * GiB // MiB
    # Nova refuses to start when reserved_host_memory_mb >= file_backed_memory.
    assert conf.getint("DEFAULT", "reserved_host_memory_mb") < conf.getint("libvirt", "file_backed_memory")


def test_reserve_from_the_config_file(host: Path) -> None:
    host.write_text(host.read_text() + '\n[nova]\nreserve = "4G"\n')
    _, out, _ = nova_config(host, "--conf")
    assert conf_of(out).getint("libvirt", "file_backed_memory") == 10 * GiB // MiB


def test_reserve_as_large_as_the_pools_is_one_line_and_exit_1(host: Path) -> None:
    assert nova_config(host, "--reserve", "14G") == (
        1, "", "dmem-libvirt: [nova] reserve 14.0 GiB leaves nothing of the 14.0 GiB dmemfs pools for Nova\n")


def test_without_an_option_both_parts_are_printed_each_under_its_file_name(host: Path) -> None:
    code, out, _ = nova_config(host)
    assert code == 0
    conf_part, _, yaml_part = out.partition("# ---- /etc/nova/provider_config/dmem-libvirt.yaml ----\n")
    assert conf_part.startswith("# ---- /etc/nova/nova.conf")
    assert conf_of(conf_part).getint("libvirt", "file_backed_memory") == 14 * GiB // MiB
    jsonschema.validate(yaml.safe_load(yaml_part), SCHEMA)


def test_page_size_trait_follows_the_pool(tmp_path: Path) -> None:
    config = make_host(tmp_path, 1, page_shift=12)
    assert config.source is not None
    _, out, _ = nova_config(config.source, "--provider-yaml")
    assert yaml.safe_load(out)["providers"][0]["traits"]["additional"] == [
        "CUSTOM_DMEM", "CUSTOM_DMEM_DMEMFS", "CUSTOM_DMEM_PAGE_4KB"]


def test_hugetlbfs_host_keeps_file_backed_memory_off_and_gets_a_trait_per_mounted_page_size(tmp_path: Path) -> None:
    config = make_huge_host(tmp_path, 2, pools={(0, 2 * MiB): (64, 64), (1, GiB): (2, 2)})
    assert config.source is not None
    code, out, err = nova_config(config.source)
    assert (code, err) == (0, "")
    conf_part, _, yaml_part = out.partition("# ---- /etc/nova/provider_config/dmem-libvirt.yaml ----\n")
    conf = conf_of(conf_part)
    # Nova refuses hw:mem_page_size guests on a host with file-backed memory.
    assert conf.getint("libvirt", "file_backed_memory") == 0
    assert "# hugetlbfs pools of 2 MiB pages: node 0 128.0 MiB, node 1 0 B" in conf_part
    assert "# hugetlbfs pools of 1 GiB pages: node 0 0 B, node 1 2.0 GiB" in conf_part
    document = yaml.safe_load(yaml_part)
    jsonschema.validate(document, SCHEMA)
    assert document["providers"][0]["traits"]["additional"] == [
        "CUSTOM_DMEM", "CUSTOM_DMEM_HUGETLBFS", "CUSTOM_DMEM_PAGE_2MB", "CUSTOM_DMEM_PAGE_1GB"]
