import pytest

from dmem_libvirt.units import GiB, KiB, MiB, format_page_size, format_size, libvirt_bytes, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("4K", 4 * KiB), ("2M", 2 * MiB), ("2MiB", 2 * MiB), ("1G", GiB), ("8gib", 8 * GiB),
    (" 16 G ", 16 * GiB), (512, 512),
])
def test_sizes_parse_in_binary_units(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "2X", "-1", "1.5G", "G", "2 M B"])
def test_bad_sizes_are_refused_quoting_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_libvirt_units_follow_libvirt_decimal_and_binary_names() -> None:
    assert libvirt_bytes("1048576", None) == GiB
    assert libvirt_bytes("1", "MB") == 1000**2
    assert libvirt_bytes("1", "MiB") == MiB
    with pytest.raises(ValueError):
        libvirt_bytes("1", "furlongs")
    with pytest.raises(ValueError):
        libvirt_bytes("12x", "KiB")


@pytest.mark.parametrize(("size", "text"), [
    (8 * GiB, "8.0 GiB"), (GiB + GiB // 2, "1.5 GiB"), (512 * MiB, "512.0 MiB"), (100, "100 B"),
    (2 * GiB - 2 * MiB, "1.998 GiB"),
])
def test_sizes_print_without_hiding_a_difference(size: int, text: str) -> None:
    assert format_size(size) == text


def test_page_sizes_print_as_whole_units() -> None:
    assert [format_page_size(s) for s in (4 * KiB, 2 * MiB, GiB)] == ["4 KiB", "2 MiB", "1 GiB"]
