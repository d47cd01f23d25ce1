"""jds.deadlines: many deadlines on one lazily kept timer."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from jds.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock.callLater, self.clock.seconds)
        self.fired: list[tuple[str, float]] = []

    def expiry(self, name: str, later: float | None = None):
        def expired() -> float | None:
            self.fired.append((name, self.clock.seconds()))
            return later

        return expired

    def active(self) -> list:
        return [call for call in self.clock.getDelayedCalls() if call.active()]

    def test_each_fires_at_its_due_on_one_timer(self) -> None:
        self.deadlines.set("a", 5.0, self.expiry("a"))
        self.clock.advance(1)
        self.deadlines.set("b", 7.0, self.expiry("b"))
        self.assertEqual(len(self.active()), 1)
        self.clock.advance(3.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [("a", 5.0)])
        self.clock.advance(2)
        self.assertEqual(self.fired, [("a", 5.0), ("b", 7.0)])
        self.assertEqual(self.active(), [])
        self.assertEqual(len(self.deadlines), 0)

    def test_discarded_never_fires_and_costs_no_cancel(self) -> None:
        self.deadlines.set("a", 5.0, self.expiry("a"))
        timer = self.active()[0]
        self.deadlines.discard("a")
        self.deadlines.discard("a")  # twice: nothing
        self.assertTrue(timer.active())  # left set: it finds nothing due
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.active(), [])

    def test_sooner_deadline_moves_the_timer(self) -> None:
        self.deadlines.set("late", 300.0, self.expiry("late"))
        self.deadlines.set("soon", 2.0, self.expiry("soon"))
        self.assertEqual(len(self.active()), 1)
        self.clock.advance(2)
        self.assertEqual(self.fired, [("soon", 2.0)])
        self.clock.advance(298)
        self.assertEqual(self.fired, [("soon", 2.0), ("late", 300.0)])

    def test_a_timer_set_for_a_discarded_one_is_set_again_for_the_rest(self) -> None:
        self.deadlines.set("first", 5.0, self.expiry("first"))
        self.deadlines.set("second", 9.0, self.expiry("second"))
        self.deadlines.discard("first")
        self.clock.advance(5)
        self.assertEqual(self.fired, [])
        self.assertEqual([call.getTime() for call in self.active()], [9.0])
        self.clock.advance(4)
        self.assertEqual(self.fired, [("second", 9.0)])

    def test_expiry_may_ask_for_a_later_look(self) -> None:
        self.deadlines.set("watch", 5.0, self.expiry("watch", later=8.0))
        self.clock.advance(5)
        self.assertEqual(self.fired, [("watch", 5.0)])
        self.assertEqual([call.getTime() for call in self.active()], [8.0])
        self.deadlines.discard("watch")
        self.clock.advance(3)
        self.assertEqual(self.fired, [("watch", 5.0)])

    def test_set_again_replaces_the_due(self) -> None:
        self.deadlines.set("a", 5.0, self.expiry("a"))
        self.deadlines.set("a", 50.0, self.expiry("a"))
        self.clock.advance(5)
        self.assertEqual(self.fired, [])
        self.clock.advance(45)
        self.assertEqual(self.fired, [("a", 50.0)])

    def test_expiry_that_sets_or_discards_others(self) -> None:
        def first() -> None:
            self.fired.append(("first", self.clock.seconds()))
            self.deadlines.discard("dropped")  # due at the same time: never fires
            self.deadlines.set("far", 100.0, self.expiry("far"))
            return None

        self.deadlines.set("first", 5.0, first)
        self.deadlines.set("dropped", 5.0, self.expiry("dropped"))
        self.deadlines.set("near", 6.0, self.expiry("near"))
        self.clock.advance(5)
        self.assertEqual(self.fired, [("first", 5.0)])
        self.assertEqual([call.getTime() for call in self.active()], [6.0])  # the soonest, not the one set last
        self.clock.advance(1)
        self.assertEqual(self.fired, [("first", 5.0), ("near", 6.0)])
        self.clock.advance(94)
        self.assertEqual(self.fired[-1], ("far", 100.0))

    def test_a_due_already_passed_fires_on_the_next_turn(self) -> None:
        self.clock.advance(10)
        self.deadlines.set("past", 3.0, self.expiry("past"))
        self.clock.advance(0)
        self.assertEqual(self.fired, [("past", 10.0)])
