"""The runs' tiling rule and the merge policy, alone."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l2_stores.engine.levels import FAN_IN, Span, TilingError, live_and_superseded, merged, merges


def test_covering_run_supersedes_what_it_covers() -> None:
    found = [Span(0, 7), Span(0, 3), Span(4, 7), Span(8, 8), Span(9, 9)]
    live, superseded = live_and_superseded(found)
    assert live == [Span(0, 7), Span(8, 8), Span(9, 9)]
    assert sorted(superseded) == [Span(0, 3), Span(4, 7)]


@pytest.mark.parametrize(
    ("found", "what"),
    [([Span(0, 3), Span(2, 5)], "overlap"), ([Span(0, 3), Span(5, 5)], "leave a gap")],
)
def test_overlaps_and_gaps_are_refused(found: list[Span], what: str) -> None:
    with pytest.raises(TilingError, match=what):
        live_and_superseded(found)


def test_spans_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="span"):
        Span(3, 2)


def simulate(logs: int, fan_in: int) -> tuple[list[Span], dict[int, int]]:
    """Freeze ``logs`` logs one after the other, merging as the policy says; count the
    writes of each generation's bindings."""
    live: list[Span] = []
    writes = dict.fromkeys(range(logs), 0)
    for generation in range(logs):
        live.append(Span(generation, generation))
        writes[generation] += 1
        while groups := merges(live, (), fan_in):
            for group in groups:
                at = live.index(group[0])
                live[at : at + len(group)] = [merged(group)]
                for written in range(group[0].lo, group[-1].hi + 1):
                    writes[written] += 1
    return live, writes


@given(st.integers(min_value=1, max_value=3000), st.sampled_from([2, 4, 8]))
def test_runs_count_logs_in_base_fan_in(logs: int, fan_in: int) -> None:
    live, writes = simulate(logs, fan_in)
    digits, rest = [], logs
    while rest:
        digits.append(rest % fan_in)
        rest //= fan_in
    assert len(live) == sum(digits)
    assert live_and_superseded(live) == (live, [])
    assert live[0].lo == 0 and live[-1].hi == logs - 1
    widths = [span.width for span in live]
    assert widths == sorted(widths, reverse=True)
    assert max(writes.values()) <= 1 + math.ceil(math.log(logs, fan_in) if logs > 1 else 0)


def test_busy_runs_wait_and_others_go_on() -> None:
    live = [Span(g, g) for g in range(2 * FAN_IN)]
    assert merges(live) == [live[:FAN_IN], live[FAN_IN:]]
    assert merges(live, busy=set(live[:FAN_IN])) == [live[FAN_IN:]]
    assert merges(live[: FAN_IN + 1], busy={live[FAN_IN]}) == [live[:FAN_IN]]
    odd = [Span(0, 36), *(Span(g, g) for g in range(37, 37 + FAN_IN - 1))]
    assert merges(odd) == []
