from pathlib import Path

import pytest

from dmem_libvirt import config
from dmem_libvirt.errors import ConfigError
from dmem_libvirt.units import GiB, MiB


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_missing_default_file_means_production_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    loaded = config.load(config.DEFAULT_PATH)
    assert loaded.dmemfs.mount == Path("/dev/dmem")
    assert loaded.libvirt.run_dir == Path("/run/libvirt/qemu")
    assert loaded.state.lock_timeout == 10.0


def test_an_explicit_config_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_values_are_typed(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, """
[dmemfs]
mount = "/mnt/dmem"
page_size = "2M"
emulate = true
[dmemfs.capacity]
0 = "16G"
1 = "8G"
[state]
lock_timeout = 2.5
"""))
    assert loaded.dmemfs.page_size == 2 * MiB
    assert loaded.dmemfs.capacity == {0: 16 * GiB, 1: 8 * GiB}
    assert loaded.dmemfs.emulate is True
    assert loaded.state.lock_timeout == 2.5


@pytest.mark.parametrize(("text", "named"), [
    ("[dmemfs]\nmonut = \"/x\"\n", "[dmemfs] monut"),
    ("[dmemf]\n", "[dmemf]"),
    ("[dmemfs]\nmount = \"relative\"\n", "[dmemfs] mount"),
    ("[dmemfs]\npage_size = \"huge\"\n", "[dmemfs] page_size"),
    ("[dmemfs]\nemulate = \"yes\"\n", "[dmemfs] emulate"),
    ("[dmemfs.capacity]\nx = \"1G\"\n", "[dmemfs] capacity"),
    ("[state]\nlock_timeout = -1\n", "[state] lock_timeout"),
    ("[backend]\nname = \"dmem\"\n", "[backend] name"),
    ("[hugetlbfs.limit]\nnode0 = \"1G\"\n", "[hugetlbfs] limit"),
    ("[hugetlbfs]\npage_size = \"big\"\n", "[hugetlbfs] page_size"),
])
def test_bad_keys_and_values_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert named in err.value.line()
    assert "\n" not in err.value.line()


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[dmemfs\n"))


def test_environment_overrides_the_default_and_flag_overrides_both(tmp_path: Path) -> None:
    assert config.resolve_path(None, {}) == config.DEFAULT_PATH
    assert config.resolve_path(None, {"DMEM_LIBVIRT_CONFIG": "/a.toml"}) == Path("/a.toml")
    assert config.resolve_path("/b.toml", {"DMEM_LIBVIRT_CONFIG": "/a.toml"}) == Path("/b.toml")


@pytest.mark.parametrize(("text", "backend"), [
    ("", "dmemfs"),
    ("[dmemfs]\nemulate = true\n", "emulated"),
    ("[backend]\nname = \"emulated\"\n", "emulated"),
    ("[backend]\nname = \"emulated\"\n[dmemfs]\nemulate = true\n", "emulated"),
    ("[backend]\nname = \"hugetlbfs\"\n", "hugetlbfs"),
])
def test_backend_comes_from_its_section_or_the_older_emulate_key(tmp_path: Path, text: str, backend: str) -> None:
    assert config.load(write(tmp_path, text)).backend_name == backend


def test_emulate_contradicting_the_named_backend_says_what_to_write(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, "[backend]\nname = \"hugetlbfs\"\n[dmemfs]\nemulate = true\n"))
    assert "[dmemfs] emulate = true contradicts [backend] name = \"hugetlbfs\"" in err.value.line()
    assert "[backend] name = \"emulated\"" in err.value.line()


def test_hugetlbfs_limits_are_sizes_per_node(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, """
[backend]
name = "hugetlbfs"
[hugetlbfs]
mount = "/dev/hugepages"
page_size = "2M"
[hugetlbfs.limit]
0 = "8G"
1 = 1073741824
"""))
    assert loaded.hugetlbfs.mount == Path("/dev/hugepages")
    assert loaded.hugetlbfs.page_size == 2 * MiB
    assert loaded.hugetlbfs.limit == {0: 8 * GiB, 1: GiB}
