"""The stream state table (sisyphus.hub.states): every state can end, nothing else is implicit."""

from __future__ import annotations

import pytest

from sisyphus.hub.states import HOLDING, TRANSITIONS, State, can_move
from sisyphus.hub.subscriber import Subscriber
from tests.hub.test_hub import FakeTransport


def test_every_state_has_a_row_and_can_end() -> None:
    """Ending is allowed from every state, so "end this stream" works wherever it is."""
    assert set(TRANSITIONS) == set(State)
    for state in State:
        assert can_move(state, State.CLOSED)


@pytest.mark.parametrize(
    ("current", "target", "allowed"),
    [
        (State.STARTING, State.LIVE, True),
        (State.STARTING, State.CATCHING_UP, False),
        (State.LIVE, State.CATCHING_UP, True),
        (State.LIVE, State.STARTING, False),
        (State.CATCHING_UP, State.LIVE, True),
        (State.CLOSED, State.LIVE, False),
        (State.CLOSED, State.CATCHING_UP, False),
    ],
)
def test_moves_follow_the_table(current: State, target: State, allowed: bool) -> None:
    """A closed stream never comes back to life, and a stream never starts twice."""
    assert can_move(current, target) is allowed


def test_holding_states_are_the_ones_that_keep_messages_raw() -> None:
    """Starting and catching-up streams hold; live ones write; closed ones drop."""
    assert frozenset({State.STARTING, State.CATCHING_UP}) == HOLDING


def test_a_subscriber_refuses_an_empty_position_and_moves_only_by_the_table() -> None:
    """A stream has the client's position from birth; a refused move changes nothing."""
    with pytest.raises(ValueError, match="position"):
        Subscriber(FakeTransport(), "1", b"", 100, 0.0)
    sub = Subscriber(FakeTransport(), "1", b"ep-1-1", 100, 0.0)
    assert sub.move(State.CATCHING_UP) is False
    assert sub.state is State.STARTING
    assert sub.move(State.CLOSED) is True
    assert sub.move(State.LIVE) is False
    assert sub.state is State.CLOSED
