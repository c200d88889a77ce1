"""Sans-IO checks of the per-connection limits (worker/limits.py) with a hand-driven clock."""

from __future__ import annotations

from worker.limits import BadCommandBudget, LoginDeadline, RepeatFilter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_deadline_counts_from_creation_and_ends_at_login():
    """The deadline runs from connect; once the login succeeded there is none."""
    clock = FakeClock()
    deadline = LoginDeadline(60, clock)
    clock.now += 45
    assert deadline.left() == 15
    deadline.met()
    clock.now += 100
    assert deadline.left() is None


def test_login_deadline_stands_still_while_paused():
    """Time spent inside paused() (a failed-login penalty) is added back, nested pauses once."""
    clock = FakeClock()
    deadline = LoginDeadline(10, clock)
    clock.now += 4
    with deadline.paused():
        clock.now += 30
        assert deadline.left() == 6  # frozen while paused
        with deadline.paused():
            clock.now += 5
    assert deadline.left() == 6
    clock.now += 7
    assert deadline.left() == -1


def test_bad_command_budget_allows_the_limit_then_refuses():
    """With a budget of 10, the 11th bad command is the one over it."""
    budget = BadCommandBudget(10)
    assert [budget.spend() for _ in range(11)] == [False] * 10 + [True]
    assert BadCommandBudget(0).spend()


def test_repeat_filter_admits_a_text_three_times_and_counts_the_rest():
    """The same text passes three times, then is counted; other texts are unaffected."""
    seen = RepeatFilter()
    assert [seen.admit("CAPA") for _ in range(5)] == [True, True, True, False, False]
    assert seen.admit("NOOP")
    assert seen.suppressed == 2


def test_repeat_filter_memory_is_bounded():
    """Past max_texts distinct texts nothing more is remembered (and nothing is suppressed)."""
    seen = RepeatFilter(max_texts=4)
    for n in range(100):
        assert seen.admit(f"USER u{n}")
    assert len(seen._seen) == 4
