"""Placement on fake node rooms: which node each guest cell gets, and what a refusal tells the user."""

from __future__ import annotations

import random

import pytest

from dmem_libvirt.errors import PlacementError
from dmem_libvirt.placement import CellNeed, NodeRoom, place
from dmem_libvirt.units import GiB, MiB

PAGE = 2 * MiB


def cells(*sizes: int, unit: int = GiB) -> list[CellNeed]:
    return [CellNeed(cell, size * unit) for cell, size in enumerate(sizes)]


def rooms(*free: float, unit: int = GiB) -> list[NodeRoom]:
    return [NodeRoom(node, int(size * unit)) for node, size in enumerate(free)]


def refusal(*args: object, **kwargs: object) -> PlacementError:
    with pytest.raises(PlacementError) as caught:
        place(*args, **kwargs)  # type: ignore[arg-type]
    return caught.value


# -- where cells go ------------------------------------------------------------------------------------


def test_single_node_host_takes_every_cell_that_fits() -> None:
    assert place("web01", cells(2, 2, 4), rooms(8), PAGE) == {0: 0, 1: 0, 2: 0}


def test_cell_too_big_for_one_node_goes_to_the_node_with_room() -> None:
    assert place("web01", cells(6), rooms(4, 8), PAGE) == {0: 1}


def test_cells_sharing_a_node_add_up_and_never_overcommit_it() -> None:
    # Two 4 GiB cells cannot both sit on a 6 GiB node: the second must go elsewhere.
    assert place("web01", cells(4, 4), rooms(6, 6), PAGE) == {0: 0, 1: 1}


def test_best_fit_picks_the_tightest_node_keeping_the_big_hole() -> None:
    host = rooms(32, 5, 16, 8)
    assert place("web01", cells(4), host, PAGE) == {0: 1}
    # The 32 GiB node stays whole for a later 24 GiB guest.
    assert place("db01", cells(24), host, PAGE) == {0: 0}


def test_eight_nodes_each_holding_one_cell_get_one_cell_each() -> None:
    result = place("big", cells(*[4] * 8), rooms(*[5] * 8), PAGE)
    assert sorted(result.values()) == list(range(8))


def test_nodes_without_dmem_are_never_chosen() -> None:
    host = [NodeRoom(0, 0), NodeRoom(1, 16 * GiB), NodeRoom(2, 0), NodeRoom(3, 16 * GiB)]
    result = place("web01", cells(8, 8, 8, 8), host, PAGE)
    assert set(result.values()) == {1, 3}


def test_packing_that_largest_first_greedy_misses_is_still_found() -> None:
    # 3+3 on one node leaves four 2s for 1+7: only 3+2+2 / 3+2+2 fits.
    result = place("web01", cells(3, 3, 2, 2, 2, 2), rooms(7, 7), PAGE)
    loads = [sum(size for cell, size in enumerate([3, 3, 2, 2, 2, 2]) if result[cell] == n) for n in (0, 1)]
    assert loads == [7, 7]


def test_order_of_nodes_in_the_input_does_not_change_the_answer() -> None:
    host = [NodeRoom(n, size * GiB, cpus=frozenset({n})) for n, size in enumerate((9, 12, 7, 12, 3))]
    need = [CellNeed(0, 6 * GiB, frozenset({3})), CellNeed(1, 5 * GiB), CellNeed(2, 3 * GiB)]
    expected = place("web01", need, host, PAGE)
    shuffled = list(host)
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert place("web01", need, shuffled, PAGE) == expected


# -- reservations and page rounding -----------------------------------------------------------------


def test_room_reserved_by_other_domains_is_not_offered() -> None:
    host = [NodeRoom(0, 8 * GiB, (("db02", 6 * GiB),)), NodeRoom(1, 5 * GiB)]
    assert host[0].available == 2 * GiB
    assert place("web01", cells(4), host, PAGE) == {0: 1}


def test_reservations_larger_than_free_leave_zero_not_negative() -> None:
    assert NodeRoom(0, 1 * GiB, (("db02", 3 * GiB),)).available == 0


def test_room_that_is_not_whole_pages_is_rounded_down() -> None:
    host = [NodeRoom(0, 4 * GiB + 1 * MiB)]
    assert place("web01", [CellNeed(0, 4 * GiB)], host, PAGE) == {0: 0}
    refused = refusal("web01", [CellNeed(0, 4 * GiB + PAGE)], host, PAGE)
    assert "4.001 GiB free" in refused.message


def test_room_left_by_an_unaligned_reservation_is_rounded_down() -> None:
    host = [NodeRoom(0, 4 * GiB, (("db02", 1 * MiB),))]
    refusal("web01", [CellNeed(0, 4 * GiB)], host, PAGE)
    assert place("web01", [CellNeed(0, 4 * GiB - PAGE)], host, PAGE) == {0: 0}


def test_cell_size_not_a_page_multiple_costs_the_next_whole_page() -> None:
    refusal("web01", [CellNeed(0, 2 * GiB + 1)], rooms(2), PAGE)
    host = [NodeRoom(0, 2 * GiB), NodeRoom(1, 2 * GiB + PAGE)]
    assert place("web01", [CellNeed(0, 2 * GiB + 1)], host, PAGE) == {0: 1}


# -- pinned vCPUs ------------------------------------------------------------------------------------


def host_with_cpus() -> list[NodeRoom]:
    return [NodeRoom(node, 16 * GiB, cpus=frozenset(range(node * 4, node * 4 + 4))) for node in range(4)]


def test_pinned_cell_goes_to_the_node_of_its_cpus() -> None:
    need = [CellNeed(0, 4 * GiB, frozenset({9, 10})), CellNeed(1, 4 * GiB, frozenset({13}))]
    assert place("web01", need, host_with_cpus(), PAGE) == {0: 2, 1: 3}


def test_pinned_cell_prefers_the_node_with_most_of_its_cpus() -> None:
    need = [CellNeed(0, 4 * GiB, frozenset({3, 4, 5, 6}))]
    assert place("web01", need, host_with_cpus(), PAGE) == {0: 1}


def test_pinned_cell_is_placed_elsewhere_when_its_node_is_full() -> None:
    host = host_with_cpus()
    host[2] = NodeRoom(2, 1 * GiB, cpus=host[2].cpus)
    result = place("web01", [CellNeed(0, 4 * GiB, frozenset({9}))], host, PAGE)
    assert result[0] != 2


def test_pinned_cell_keeps_its_node_from_an_unpinned_cell_of_the_same_size() -> None:
    host = [NodeRoom(0, 8 * GiB, cpus=frozenset({0, 1})), NodeRoom(1, 4 * GiB, cpus=frozenset({2, 3}))]
    need = [CellNeed(0, 4 * GiB), CellNeed(1, 4 * GiB, frozenset({2}))]
    assert place("web01", need, host, PAGE) == {0: 0, 1: 1}


# -- fixed placement (--nodes, or the placement recorded in the domain) -------------------------------


def test_fixed_placement_that_fits_is_kept_and_others_placed_around_it() -> None:
    result = place("web01", cells(6, 6), rooms(8, 8), PAGE, fixed={0: 1})
    assert result == {0: 1, 1: 0}


def test_fixed_node_room_is_taken_before_free_cells_are_placed() -> None:
    # Cell 1 would best-fit on node 1 but the fixed cell 0 already fills it.
    assert place("web01", cells(4, 2), rooms(8, 4), PAGE, fixed={0: 1}) == {0: 1, 1: 0}


def test_fixed_placement_that_does_not_fit_is_refused_with_the_numbers() -> None:
    host = [NodeRoom(0, 16 * GiB), NodeRoom(1, 2 * GiB, (("db02", 3 * GiB // 2),))]
    err = refusal("web01", cells(8, 8), host, PAGE, fixed={1: 1})
    assert err.line() == ("dmem-libvirt: web01: guest cell 1 needs 8.0 GiB of 2 MiB dmem pages on host "
                          "node 1; 2.0 GiB free, 1.5 GiB reserved by db02")


def test_fixed_cells_that_only_overflow_together_are_named_together() -> None:
    err = refusal("web01", cells(4, 4), rooms(6, 6), PAGE, fixed={0: 0, 1: 0})
    assert err.message == ("guest cells 0 and 1 need 4.0 GiB + 4.0 GiB of 2 MiB dmem pages on host node 0; "
                           "6.0 GiB free")


def test_fixed_node_that_does_not_exist_is_refused_with_the_nodes_that_do() -> None:
    host = [NodeRoom(0, 8 * GiB), NodeRoom(2, 8 * GiB)]
    err = refusal("web01", cells(4, 4), host, PAGE, fixed={1: 5})
    assert "host node 5" in err.message
    assert "host nodes with dmem: 0, 2" in err.message
    assert err.domain == "web01"


def test_fixed_entry_for_a_cell_the_guest_no_longer_has_is_ignored() -> None:
    assert place("web01", cells(4), rooms(8), PAGE, fixed={0: 0, 3: 7}) == {0: 0}


# -- guests without NUMA cells ------------------------------------------------------------------------


def test_guest_without_cells_gets_one_node_even_when_split_would_fit() -> None:
    need = [CellNeed(0, 8 * GiB)]
    assert place("web01", need, rooms(6, 10), PAGE, cellless=True) == {0: 1}
    refusal("web01", need, rooms(6, 6), PAGE, cellless=True)


def test_guest_without_cells_refusal_lists_every_node() -> None:
    host = [NodeRoom(0, 6 * GiB, (("db02", 3 * GiB // 2),)), NodeRoom(1, 3 * GiB)]
    err = refusal("web01", [CellNeed(0, 8 * GiB)], host, PAGE, cellless=True)
    assert err.line() == ("dmem-libvirt: web01: guest needs 8.0 GiB of 2 MiB dmem pages on one host node; "
                          "node 0: 6.0 GiB free, 1.5 GiB reserved by db02; node 1: 3.0 GiB free")


def test_guest_without_cells_fixed_to_a_small_node_is_refused() -> None:
    err = refusal("web01", [CellNeed(0, 8 * GiB)], rooms(16, 4), PAGE, cellless=True, fixed={0: 1})
    assert err.message == "guest needs 8.0 GiB of 2 MiB dmem pages on host node 1; 4.0 GiB free"


# -- refusals ----------------------------------------------------------------------------------------


def test_refusal_names_each_cell_each_node_and_who_holds_the_room() -> None:
    host = [NodeRoom(0, 6 * GiB, (("db02", 3 * GiB // 2),)), NodeRoom(1, 3 * GiB)]
    err = refusal("web01", cells(8, 4), host, PAGE)
    assert err.line() == ("dmem-libvirt: web01: guest cells need 8.0 GiB + 4.0 GiB of 2 MiB dmem pages; "
                          "no placement fits: node 0 6.0 GiB free (1.5 GiB reserved by db02), "
                          "node 1 3.0 GiB free")
    assert "\n" not in err.line()


def test_refusal_names_every_domain_holding_room_with_its_share() -> None:
    host = [NodeRoom(0, 8 * GiB, (("db02", 1 * GiB), ("web03", 512 * MiB)))]
    err = refusal("web01", cells(8), host, PAGE)
    assert "1.5 GiB reserved by db02 (1.0 GiB) and web03 (512.0 MiB)" in err.message


def test_refusal_with_fixed_cells_says_which_cells_were_fixed() -> None:
    err = refusal("web01", cells(2, 8, 8), rooms(10, 9), PAGE, fixed={0: 1})
    assert err.message.startswith("guest cells 1 and 2 need 8.0 GiB + 8.0 GiB of 2 MiB dmem pages besides "
                                  "cell 0 (2.0 GiB) on node 1; no placement fits")


def test_refusal_on_a_host_without_dmem_says_so() -> None:
    err = refusal("web01", cells(1, 1), [], PAGE)
    assert "no host node has a dmem pool" in err.message


def test_large_host_refusal_beyond_the_search_limit_says_it_stopped() -> None:
    rng = random.Random(1)
    unit = 4 * MiB
    host = rooms(*rng.sample(range(3600, 3900), 15), *rng.sample(range(2000, 2100), 49), unit=unit)
    err = refusal("web01", cells(*rng.sample(range(2200, 3500), 16), unit=unit), host, PAGE)
    assert "no placement found within the search limit" in err.message


# -- policies and bad input ----------------------------------------------------------------------------


def test_first_fit_takes_the_lowest_numbered_node_and_worst_fit_the_roomiest() -> None:
    host = rooms(16, 5, 32)
    assert place("web01", cells(4), host, PAGE, policy="first-fit") == {0: 0}
    assert place("web01", cells(4), host, PAGE, policy="worst-fit") == {0: 2}
    assert place("web01", cells(4), host, PAGE) == {0: 1}


def test_unknown_policy_and_duplicate_nodes_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="unknown placement policy"):
        place("web01", cells(1), rooms(8), PAGE, policy="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate host node"):
        place("web01", cells(1), [NodeRoom(0, GiB), NodeRoom(0, GiB)], PAGE)
