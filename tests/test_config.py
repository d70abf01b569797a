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
