"""`dmem-libvirt metrics`: the Prometheus text format, parsed by prometheus_client as Prometheus would.

Every value must equal what `status --json` says; the hook's admissions, refusals and failures are counted
durably per boot; the textfile is replaced atomically and readable by node_exporter.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_mock import MockerFixture
from test_hook import Call, Rig, enabled, guest_xml, live, start_guest

from dmem_libvirt import cli, counters
from dmem_libvirt.units import MiB

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def dmem(rig: Rig, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main([*argv, "--config", str(rig.config_path)], stdin=io.BytesIO(b""), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Metric family name -> type, and (sample name, sorted labels) -> value."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, samples


def scrape(rig: Rig) -> tuple[dict[str, str], Samples, dict[str, object]]:
    code, text, err = dmem(rig, "metrics")
    assert (code, err) == (0, "")
    code, status_json, err = dmem(rig, "status", "--json")
    assert (code, err) == (0, "")
    return (*parse(text), json.loads(status_json))


@pytest.fixture
def busy(rig: Rig) -> Rig:
    """web01 running and pinned on node 0, db02 admitted on node 1, a guest refused for want of room."""
    start_guest(rig, "web01", enabled(guest_xml("web01", [16 * MiB]), [0]), 3, 4242)
    assert rig.call("db02", "prepare", "begin", live(enabled(guest_xml("db02", [8 * MiB]), [1]), 4)).code == 0
    big = live(enabled(guest_xml("big03", [64 * MiB]), [0]), 5)
    refused = rig.call("big03", "prepare", "begin", big)
    assert refused.code == 1 and "big03" in refused.stderr
    return rig


def test_metrics_equal_status_json(busy: Rig) -> None:
    types, samples, status = scrape(busy)
    page = str(status["page_size"])
    pools = status["pools"]
    assert isinstance(pools, list) and len(pools) == 2
    for pool in pools:
        for field in ("total", "free", "reserved", "pinned"):
            key = (f"dmem_libvirt_pool_{field}_bytes", (("node", str(pool["node"])), ("page_size", page)))
            assert samples[key] == pool[field], key
    domains = status["domains"]
    assert isinstance(domains, list)
    held = {(name, labels): value for (name, labels), value in samples.items()
            if name == "dmem_libvirt_domain_reserved_bytes"}
    assert held == {("dmem_libvirt_domain_reserved_bytes", (("domain", d["name"]), ("uuid", d["uuid"]))): d["bytes"]
                    for d in domains}
    assert samples[("dmem_libvirt_struct_page_saved_bytes", ())] == status["struct_page_saved"]
    assert types["dmem_libvirt_admissions"] == "counter"
    assert types["dmem_libvirt_pool_free_bytes"] == "gauge"


def test_what_the_hook_did_is_counted_and_matches_status_json(busy: Rig) -> None:
    _, samples, status = scrape(busy)
    assert status["counters"] == {
        "admissions": {"prepare": 2, "start": 0},
        "refusals": {"placement": 1, "domain_xml": 0, "pin": 0, "host": 0, "config": 0, "ledger": 0,
                     "lock_timeout": 0, "other": 0},
        "hook_failures": dict.fromkeys(counters.FAMILIES["hook_failures"], 0),
    }
    assert samples[("dmem_libvirt_admissions_total", (("operation", "prepare"),))] == 2
    assert samples[("dmem_libvirt_refusals_total", (("reason", "placement"),))] == 1
    assert samples[("dmem_libvirt_refusals_total", (("reason", "pin"),))] == 0
    assert samples[("dmem_libvirt_hook_failures_total", (("operation", "release"),))] == 0
    _, table, _ = dmem(busy, "status")
    assert "since boot: 2 admitted, 1 refused (placement 1), 0 hook failures" in table.splitlines()


def test_the_pinned_guest_shows_as_pinned_and_taken_from_free(busy: Rig) -> None:
    _, samples, _ = scrape(busy)
    node0 = (("node", "0"), ("page_size", str(2 * MiB)))
    node1 = (("node", "1"), ("page_size", str(2 * MiB)))
    assert samples[("dmem_libvirt_pool_pinned_bytes", node0)] == 16 * MiB
    assert samples[("dmem_libvirt_pool_free_bytes", node0)] == 48 * MiB
    assert samples[("dmem_libvirt_pool_reserved_bytes", node1)] == 8 * MiB
    assert samples[("dmem_libvirt_pool_total_bytes", node1)] == 64 * MiB


def test_a_hook_call_that_fails_where_it_must_not_is_counted(rig: Rig, mocker: MockerFixture) -> None:
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 3)
    assert rig.call("web01", "prepare", "begin", xml) == Call(0, "", "")
    mocker.patch("dmem_libvirt.lifecycle.release", side_effect=RuntimeError("disk on fire"))
    assert rig.call("web01", "release", "end", xml) == Call(0, "", "")
    assert rig.call("web01", "release", "end", xml) == Call(0, "", "")
    _, samples, _ = scrape(rig)
    assert samples[("dmem_libvirt_hook_failures_total", (("operation", "release"),))] == 2


def test_a_start_that_prepare_did_not_admit_counts_as_admitted_at_start(rig: Rig) -> None:
    xml = live(enabled(guest_xml("web01", [16 * MiB]), [0]), 3)
    rig.domain_dir("web01", 3)
    assert rig.call("web01", "start", "begin", xml) == Call(0, "", "")
    _, samples, _ = scrape(rig)
    assert samples[("dmem_libvirt_admissions_total", (("operation", "start"),))] == 1
    assert samples[("dmem_libvirt_admissions_total", (("operation", "prepare"),))] == 0


def test_counters_survive_processes_and_start_again_at_boot(rig: Rig) -> None:
    state = rig.config.state.dir
    counters.add(state, "boot-a", "refusals", "pin")
    counters.add(state, "boot-a", "refusals", "pin")
    assert counters.read(state, "boot-a")["refusals"]["pin"] == 2
    assert counters.read(state, "boot-b")["refusals"]["pin"] == 0
    counters.add(state, "boot-b", "admissions", "start")
    assert counters.read(state, "boot-b")["refusals"]["pin"] == 0
    assert counters.read(state, "boot-b")["admissions"]["start"] == 1
    (state / counters.FILE_NAME).write_text("{not json")
    assert counters.read(state, "boot-b") == counters.zero()


def test_label_values_are_escaped(rig: Rig) -> None:
    name = 'we"b\\01'
    assert rig.call(name, "prepare", "begin", live(enabled(guest_xml(name, [8 * MiB]), [0]), 3)).code == 0
    _, samples, _ = scrape(rig)
    domains = [dict(labels)["domain"] for (metric, labels) in samples if metric == "dmem_libvirt_domain_reserved_bytes"]
    assert domains == [name]


def test_textfile_is_replaced_atomically_and_world_readable(busy: Rig, tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "dmem_libvirt.prom"
    target.parent.mkdir()
    target.write_text("stale\n")
    os.chmod(target, 0o600)
    assert dmem(busy, "metrics", "--textfile", str(target)) == (0, "", "")
    _, stdout_text, _ = dmem(busy, "metrics")
    assert target.read_text() == stdout_text
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["dmem_libvirt.prom"]


def test_textfile_errors_are_one_line(busy: Rig, tmp_path: Path) -> None:
    assert dmem(busy, "metrics", "--textfile", str(tmp_path / "dmem_libvirt.txt")) == (
        1, "", f"dmem-libvirt: textfile {tmp_path / 'dmem_libvirt.txt'} must end in .prom: node_exporter's "
               "textfile collector reads only *.prom\n")
    missing = tmp_path / "no-such-dir" / "dmem_libvirt.prom"
    assert dmem(busy, "metrics", "--textfile", str(missing)) == (
        1, "", f"dmem-libvirt: cannot write the metrics to {missing}: No such file or directory\n")


def test_the_systemd_example_runs_a_command_line_the_command_accepts() -> None:
    service = Path(__file__).resolve().parent.parent / "examples" / "dmem-libvirt-metrics.service"
    [exec_start] = [line for line in service.read_text().splitlines() if line.startswith("ExecStart=")]
    program, *argv = exec_start.removeprefix("ExecStart=").split()
    assert program == "/usr/bin/dmem-libvirt"
    args = cli.build_parser().parse_args(argv)
    assert (args.command, args.textfile) == ("metrics", Path("/var/lib/prometheus/node-exporter/dmem_libvirt.prom"))
