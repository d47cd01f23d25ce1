"""
Reconnecting a WebSocket whose hub side broke, in memory (the harness of test_relay.py: an
autobahn IDE, the relay, an autobahn server playing jupyter_server; time is a clock), and the pure
decisions of :mod:`jds.reconnect`.
"""

from __future__ import annotations

import datetime
import json

from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from test_kernels_hub import encode_v1
from test_relay import TARGET, TOKEN, V1, RelayTestCase, jupyter_answer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from jds import relay_frames
from jds.paths import HubTarget
from jds.reconnect import (
    HeldFrames,
    Outage,
    ReconnectPolicy,
    ReplayCount,
    backoff,
    describe_duration,
    message_date,
    reconnectable,
    with_session_id,
)
from jds.refusal import Refusal
from jds.relay_frames import PeerReading
from jds.stats import Stats

TERMINAL_PATH = f"/terminals/websocket/1?token={TOKEN}"
NAMED = HubTarget(host="127.0.0.1", port=8443, user="alice", tls_name="hub.test", server="lab2")


def v1_message(channel: str, date: str, text: str = "") -> bytes:
    """A kernel message in jupyter_server's v1 binary framing."""
    header = {"msg_id": text, "msg_type": "stream", "date": date}
    return encode_v1(channel, {"header": header, "parent_header": {}, "metadata": {}, "content": {"text": text}})


def iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


class PureTests(SynchronousTestCase):
    def test_which_sockets_reconnect(self) -> None:
        self.assertEqual(reconnectable(b"/api/kernels/0b1c-2d/channels"), "kernel")
        self.assertEqual(reconnectable(b"/terminals/websocket/1"), "terminal")
        self.assertEqual(reconnectable(b"/api/events/subscribe"), "events")
        for other in (b"/lsp/ws/pylsp", b"/api/kernels/k1", b"/api/kernels/k1/channels/x", b"/api/yjs/room"):
            self.assertIsNone(reconnectable(other), other)

    def test_session_id_added_once_and_kept(self) -> None:
        self.assertEqual(with_session_id(b"session_id=abc&x=1"), b"session_id=abc&x=1")
        added = with_session_id(b"x=1")
        self.assertRegex(added.decode(), r"^x=1&session_id=jds-[0-9a-f]{32}$")
        self.assertRegex(with_session_id(b"").decode(), r"^session_id=jds-[0-9a-f]{32}$")
        self.assertRegex(with_session_id(b"session_id=&x=1").decode(), r"^x=1&session_id=jds-[0-9a-f]{32}$")
        self.assertNotEqual(with_session_id(b""), with_session_id(b""))

    def test_backoff_doubles_from_half_a_second_to_ten(self) -> None:
        delays = backoff()
        self.assertEqual([next(delays) for _ in range(8)], [0.5, 1, 2, 4, 8, 10, 10, 10])

    def test_durations_read_well(self) -> None:
        self.assertEqual(describe_duration(3.24), "3.2 s")
        self.assertEqual(describe_duration(250), "4 min 10 s")
        self.assertEqual(describe_duration(7500), "2 h 5 min")

    def test_window_and_bound_reasons_fit_a_close_frame(self) -> None:
        policy = ReconnectPolicy(window=900, max_held=64 << 20)
        outage = Outage("reset", started=100.0, wall_started=0.0)
        self.assertIsNone(policy.gave_up(outage, 999.9))
        reason = policy.gave_up(outage, 1000.0)
        self.assertEqual(reason, "The hub was unreachable for 15 min 0 s; jupyter-dev-server gave up (--reconnect-window).")
        held = policy.too_much_held(outage, 142.0)
        self.assertIn("42.0 s", held)
        self.assertIn("64 MiB", held)
        for text in (reason, held, policy.gave_up(outage, 100.0 + 86400)):
            self.assertLessEqual(len(text.encode()), 123, text)
        self.assertFalse(ReconnectPolicy(window=0).enabled)

    def test_held_frames_bound(self) -> None:
        held = HeldFrames(limit=10)
        self.assertTrue(held.hold(b"12345", False))
        self.assertTrue(held.hold(b"67890", True))
        self.assertFalse(held.hold(b"x", False))
        self.assertEqual(held.take(), [(b"12345", False), (b"67890", True), (b"x", False)])
        self.assertEqual(held.size, 0)

    def test_message_dates_in_both_framings(self) -> None:
        when = 1_790_000_000.25
        self.assertAlmostEqual(message_date(v1_message("iopub", iso(when)), True, V1), when, places=3)
        legacy = json.dumps({"header": {"date": "2026-12-01T04:00:00.500000+00:00"}}).encode()
        self.assertAlmostEqual(
            message_date(legacy, False, None),
            datetime.datetime(2026, 12, 1, 4, 0, 0, 500000, datetime.timezone.utc).timestamp(),
        )
        for junk, binary, protocol in ((b"\x00" * 4, True, V1), (b"not json", False, None), (b"\x01", True, None)):
            self.assertIsNone(message_date(junk, binary, protocol))

    def test_replay_count_ends_at_the_first_new_message(self) -> None:
        # the last message before the drop: kernel date 1000.0, received at wall 5000.0;
        # reconnected at wall 5010.0, so the kernel's clock then read about 1010.0
        count = ReplayCount((1000.0, 5000.0), 5010.0)
        for date in (1003.0, 1006.0, 1009.9, 1010.5, 1004.0):
            count.seen(date)
        self.assertEqual(count.replayed, 3)
        self.assertEqual(count.describe(), "3 messages replayed by the server")
        unknown = ReplayCount(None, 5010.0)
        unknown.seen(1.0)
        self.assertEqual(unknown.describe(), "replayed messages not counted")


class OutageTestCase(RelayTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.stats = Stats(clock=self.clock.seconds)
        self.make_relay(stats=self.stats, monotonic=self.clock.seconds)

    def advance(self, seconds: float, step: float = 0.25) -> None:
        """Let time pass in small steps, delivering what moves."""
        steps = int(round(seconds / step))
        for _ in range(steps):
            self.clock.advance(step)
            self.network.pump()

    def log(self) -> str:
        return "\n".join(formatEvent(event) or "" for event in self.events)

    def drop_hub(self) -> None:
        """A reset on the hub's side: no close frame."""
        self.hub_factory.hubs[-1].transport.abortConnection()
        self.network.pump()


class ReconnectTests(OutageTestCase):

    def test_a_reset_is_survived_with_the_same_session_and_held_messages_in_order(self) -> None:
        ide, _ = self.open_ide()
        first = self.hub
        self.drop_hub()
        self.assertIsNone(ide.closed)
        self.assertNotIn("hub link lost", self.log())  # said on the next turn, for all sockets at once
        self.clock.advance(0)
        self.assertRegex(self.log(), r"hub link lost: .*; 1 WebSocket holding")
        self.policy.failure = Failure(Refused())  # refused for a while
        ide.sendMessage(b"held 1", False)
        ide.sendMessage(b"\x00held 2", True)
        self.network.pump()
        self.advance(3.5)  # attempts at 0.5, 1.5, 3.5
        self.assertEqual(self.policy.attempts, 1 + 3)
        self.assertEqual(len(self.hub_factory.hubs), 1)
        self.policy.failure = None
        self.advance(4)  # the next attempt at 7.5
        self.assertEqual(len(self.hub_factory.hubs), 2)
        second = self.hub_factory.hubs[-1]
        self.assertIsNot(second, first)
        self.assertEqual(second.request.path, first.request.path)
        self.assertEqual(second.request.params["session_id"], ["s1"])
        self.assertEqual(second.request.headers["authorization"], f"token {TOKEN}")
        self.assertEqual(second.request.protocols, [V1])
        self.assertEqual(second.messages, [(b"held 1", False), (b"\x00held 2", True)])
        ide.sendMessage(b"after", False)
        second.sendMessage(b"to the IDE", False)
        self.network.pump()
        self.assertEqual(second.messages[-1], (b"after", False))
        self.assertEqual(ide.messages, [(b"to the IDE", False)])
        self.assertIsNone(ide.closed)
        self.advance(2.5)
        self.assertRegex(self.log(), r"reconnected after 7\.5 s; .*2 held messages sent")
        snapshot = self.stats.snapshot()["hub_link"]
        self.assertEqual(
            snapshot, {"lost": 1, "reconnected": 1, "gave_up": 0, "last_outage_seconds": 7.5, "outage": None}
        )
        self.assertEqual(self.stats.open_websockets, 1)
        self.assertEqual(self.relay.holding, set())
        self.assertLogsClean()

    def test_flow_control_is_coupled_again_after_the_reconnect(self) -> None:
        ide, proxy_end = self.open_ide()
        old_hub_end = self.hub.transport.other
        old_hub_end.producer.pauseProducing()  # the hub was slow: reading from the IDE paused
        self.assertEqual(proxy_end.producerState, "paused")
        self.drop_hub()
        self.assertEqual(proxy_end.producerState, "producing", "the IDE must be read while the hub is away")
        self.assertIsNone(proxy_end.producer)
        self.advance(0.5)
        new_hub_end = self.hub_factory.hubs[-1].transport.other
        self.assertIsInstance(proxy_end.producer, PeerReading)
        self.assertIsInstance(new_hub_end.producer, PeerReading)
        proxy_end.producer.pauseProducing()  # a slow IDE pauses the new hub socket
        self.assertEqual(new_hub_end.producerState, "paused")
        proxy_end.producer.resumeProducing()
        new_hub_end.producer.pauseProducing()  # and a slow hub the IDE
        self.assertEqual(proxy_end.producerState, "paused")

    def test_sockets_under_the_servers_own_base_url_are_held_too(self) -> None:
        """
        JupyterLab opened through the proxy uses the server's base URL (``/user/NAME/...``, and for a
        named server ``/user/NAME/SERVER/...``): its kernel, terminal and event sockets are the IDE's
        and must survive a drop the same way.
        """
        for target, prefix in ((TARGET, "/user/alice"), (NAMED, "/user/alice/lab2")):
            self.make_relay(target=target, stats=self.stats, monotonic=self.clock.seconds)
            for path in (
                f"{prefix}/api/kernels/k1/channels?session_id=s1&token={TOKEN}",
                f"{prefix}/terminals/websocket/1?token={TOKEN}",
                f"{prefix}/api/events/subscribe?token={TOKEN}",
            ):
                ide, _ = self.open_ide(path)
                first = self.hub_factory.hubs[-1]
                first.transport.abortConnection()  # a reset: no close frame
                self.network.pump()
                self.assertIsNone(ide.closed, path)
                self.advance(0.5)
                second = self.hub_factory.hubs[-1]
                self.assertIsNot(second, first, path)
                self.assertEqual(second.request.path, first.request.path)
                ide.sendMessage(b"after", False)
                self.network.pump()
                self.assertEqual(second.messages[-1], (b"after", False), path)
                self.assertIsNone(ide.closed, path)

    def test_a_kernel_socket_without_session_id_gets_a_stable_one(self) -> None:
        self.open_ide(f"/api/kernels/k1/channels?token={TOKEN}")
        [session] = self.hub.request.params["session_id"]
        self.assertTrue(session.startswith("jds-"))
        self.drop_hub()
        self.advance(0.5)
        self.assertEqual(self.hub_factory.hubs[-1].request.params["session_id"], [session])

    def test_status_shows_the_outage_while_it_lasts(self) -> None:
        self.open_ide()
        self.open_ide(TERMINAL_PATH)
        self.policy.failure = Failure(Refused())
        for hub in list(self.hub_factory.hubs):
            hub.transport.abortConnection()
        self.network.pump()
        self.clock.advance(0)
        self.assertRegex(self.log(), r"hub link lost: .*; 2 WebSockets holding")
        self.advance(4)
        outage = self.stats.snapshot()["hub_link"]["outage"]
        self.assertEqual(outage["websockets_holding"], 2)
        self.assertEqual(outage["seconds"], 4.0)
        self.policy.failure = None
        self.advance(4)
        link = self.stats.snapshot()["hub_link"]
        self.assertEqual((link["lost"], link["reconnected"], link["outage"]), (2, 2, None))

    def test_messages_written_before_the_drop_are_not_sent_again(self) -> None:
        """A request that may have reached the kernel is never re-sent on a guess."""
        ide, _ = self.open_ide()
        ide.sendMessage(b"execute_request", False)
        self.network.pump()
        self.assertEqual(self.hub.messages, [(b"execute_request", False)])
        self.drop_hub()
        self.advance(1)
        self.assertEqual(self.hub_factory.hubs[-1].messages, [])

    def test_a_message_half_sent_when_the_link_drops_goes_whole_to_the_next_link(self) -> None:
        """
        Its first piece went into the dead connection, so the server never had the whole message
        (a WebSocket server acts on whole messages only): the next link gets all of it, once.
        """
        self.patch(relay_frames, "FRAME_PIECE", 1)
        ide, _ = self.open_ide()
        first = self.hub
        self.begin_frame(ide, 3000, b"a" * 1000)
        self.drop_hub()
        ide.sendMessageFrameData(b"b" * 2000)
        ide.endMessage()
        ide.sendMessage(b"next", False)
        self.network.pump()
        self.advance(0.5)
        second = self.hub_factory.hubs[-1]
        self.assertIsNot(second, first)
        self.assertEqual(first.messages, [])
        self.assertEqual(second.messages, [(b"a" * 1000 + b"b" * 2000, True), (b"next", False)])
        self.assertIsNone(ide.closed)
        self.assertIn("the hub link was lost 3000 bytes into a message from the IDE", self.log())
        self.advance(2.5)
        self.assertRegex(self.log(), r"reconnected after 0\.5 s; .*2 held messages sent")

    def test_a_half_sent_message_larger_than_the_reconnect_buffer_ends_the_socket(self) -> None:
        self.patch(relay_frames, "FRAME_PIECE", 1)
        self.make_relay(monotonic=self.clock.seconds, reconnect=ReconnectPolicy(max_held=1000))
        ide, _ = self.open_ide()
        self.policy.failure = Failure(Refused())
        self.begin_frame(ide, 3000, b"a" * 1500)
        self.drop_hub()
        ide.sendMessageFrameData(b"b" * 1500)
        ide.endMessage()
        self.network.pump()
        self.assertEqual(ide.closed[1], 1011)
        self.assertIn("--reconnect-buffer", ide.closed[2])
        self.assertEqual(self.relay.links, set())

    def test_a_message_half_relayed_to_the_ide_when_the_link_drops_ends_the_socket(self) -> None:
        """The IDE has part of a message that can never be finished: it gets 1011, not the part."""
        self.patch(relay_frames, "FRAME_PIECE", 1)
        ide, _ = self.open_ide()
        self.begin_frame(self.hub, 3000, b"a" * 1000)
        self.drop_hub()
        self.assertEqual(ide.closed[1:], (1011, "The hub connection was lost in the middle of a message."))
        self.assertEqual(ide.messages, [])
        self.assertEqual(self.policy.attempts, 1)
        self.assertEqual(self.relay.links, set())

    def test_window_over_closes_the_ide_with_1011_and_how_long(self) -> None:
        self.make_relay(stats=self.stats, monotonic=self.clock.seconds, reconnect=ReconnectPolicy(window=60))
        ide, proxy_end = self.open_ide()
        self.policy.failure = Failure(Refused())
        self.drop_hub()
        self.advance(59)
        self.assertIsNone(ide.closed)
        self.advance(10)
        self.assertEqual(ide.closed[1:], (1011, "The hub was unreachable for 1 min 5 s; jupyter-dev-server gave up (--reconnect-window)."))
        self.assertEqual(self.relay.links, set())
        self.assertEqual(self.stats.snapshot()["hub_link"]["gave_up"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_held_bytes_past_the_bound_close_the_ide_with_1011(self) -> None:
        self.make_relay(monotonic=self.clock.seconds, reconnect=ReconnectPolicy(max_held=1000))
        ide, _ = self.open_ide()
        self.policy.failure = Failure(Refused())
        self.drop_hub()
        self.advance(2)
        ide.sendMessage(b"x" * 600, False)
        self.network.pump()
        self.assertIsNone(ide.closed)
        ide.sendMessage(b"y" * 600, False)
        self.network.pump()
        self.assertEqual(ide.closed[1], 1011)
        self.assertIn("unreachable for 2.0 s", ide.closed[2])
        self.assertIn("--reconnect-buffer", ide.closed[2])
        self.assertEqual(self.relay.links, set())

    def test_kernel_gone_after_the_outage_closes_the_ide(self) -> None:
        ide, _ = self.open_ide()
        self.drop_hub()

        def gone(request):
            raise ConnectionDeny(404, "Not Found")

        self.hub_factory.answer = gone
        self.advance(1)  # the first 404 at 0.5 s may be the hub's own while it restores routes
        self.assertIsNone(ide.closed)
        self.advance(1)  # the second, at 1.5 s, is believed
        self.assertEqual(ide.closed[1], 1011)
        self.assertIn("kernel is gone (404", ide.closed[2])
        self.assertEqual(self.relay.links, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_hub_answering_503_meanwhile_is_tried_again(self) -> None:
        ide, _ = self.open_ide()
        self.drop_hub()

        def unavailable(request):
            raise ConnectionDeny(503, "Service Unavailable")

        self.hub_factory.answer = unavailable
        self.advance(2)
        self.assertEqual(len(self.hub_factory.hubs), 3)  # the first, attempts at 0.5 and 1.5
        self.hub_factory.answer = jupyter_answer
        self.advance(2)
        self.assertEqual(self.hub_factory.hubs[-1].state, WebSocketProtocol.STATE_OPEN)
        self.assertIsNone(ide.closed)

    def test_a_silent_link_is_noticed_within_45_seconds_by_default(self) -> None:
        ide, _ = self.open_ide()
        hub = self.hub
        relay_end = hub.transport.other  # the relay's end of the hub connection
        hub.transport.producerState = "paused"  # nothing reaches the hub any more: no pongs either
        hub.transport.closed = True  # and nothing comes from it
        self.advance(44.75)
        self.assertNotIn("hub link lost", self.log())
        self.advance(0.5)
        self.assertIn("hub link lost: no answer to a ping within 15 s", self.log())
        self.assertIsNone(ide.closed)
        written = len(relay_end.history)
        ide.sendMessage(b"request after the silence", False)
        self.network.pump()
        self.assertEqual(len(relay_end.history), written, "written into the dead socket")
        self.advance(1)
        self.assertEqual(self.hub_factory.hubs[-1].messages, [(b"request after the silence", False)])

    def test_a_message_to_the_ide_not_yet_passed_on_when_the_link_drops_is_lost_like_any(self) -> None:
        """Nothing of it reached the IDE (pieces gather to FRAME_PIECE): the socket holds and reconnects."""
        ide, _ = self.open_ide()
        self.begin_frame(self.hub, 3000, b"a" * 1000)
        self.drop_hub()
        self.advance(0.5)
        self.assertIsNone(ide.closed)
        self.assertEqual(self.policy.attempts, 2)
        self.hub_factory.hubs[-1].sendMessage(b"after", True)
        self.network.pump()
        self.assertEqual(ide.messages, [(b"after", True)])

    def test_a_long_message_still_arriving_is_not_a_silent_link(self) -> None:
        """Its pieces keep coming after the pong timeout: the link is alive, though no frame ended."""
        ide, _ = self.open_ide()
        hub = self.hub
        hub.autoPingInterval = 0  # the hub reads the relay's ping but does not answer it (busy sending)
        hub.onPing = lambda payload: None
        hub.beginMessage(isBinary=True)
        hub.beginMessageFrame(100 * 1000)
        for _ in range(100):  # 50 s of 1000 bytes every half second
            hub.sendMessageFrameData(b"x" * 1000)
            self.advance(0.5)
        hub.endMessage()
        self.network.pump()
        self.assertEqual(self.policy.attempts, 1, "the relay took a busy link for a dead one")
        self.assertIsNone(ide.closed)
        self.assertEqual(ide.messages, [(b"x" * 100_000, True)])

    def test_the_ide_leaving_during_an_outage_ends_everything(self) -> None:
        ide, proxy_end = self.open_ide()
        self.policy.failure = Failure(Refused())
        self.drop_hub()
        self.advance(1)
        ide.sendClose(1000)
        self.network.pump()
        self.assertEqual(self.relay.links, set())
        self.assertEqual(self.relay.holding, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.stats.snapshot()["hub_link"]["outage"], None)

    def test_shutdown_during_an_outage_is_1001(self) -> None:
        ide, _ = self.open_ide()
        self.policy.failure = Failure(Refused())
        self.drop_hub()
        self.advance(1)
        done = self.relay.shutdown()
        self.network.pump()
        self.assertEqual(ide.closed[:2], (True, 1001))
        self.assertIsNone(self.successResultOf(done))

    def test_a_close_frame_from_the_kernel_still_ends_the_socket(self) -> None:
        ide, _ = self.open_ide()
        self.hub.sendClose(4002, "kernel died")
        self.network.pump()
        self.assertEqual(ide.closed, (True, 4002, "kernel died"))
        self.assertEqual(self.policy.attempts, 1)

    def test_reconnecting_off_closes_with_1011_as_before(self) -> None:
        self.make_relay(monotonic=self.clock.seconds, reconnect=ReconnectPolicy(window=0))
        ide, _ = self.open_ide()
        self.drop_hub()
        self.assertEqual(ide.closed, (True, 1011, "The hub connection was lost."))

    def test_replayed_messages_are_counted_in_the_log_line(self) -> None:
        now = self.clock.seconds()
        self.hub_factory.greeting = [(v1_message("iopub", iso(now - 0.1), "before"), True)]
        ide, _ = self.open_ide()
        self.drop_hub()
        # jupyter_server replays what the kernel said during the outage, then carries on
        gap = [v1_message("iopub", iso(now + t), f"line {t}") for t in (0.1, 0.2, 0.3)]
        self.hub_factory.greeting = [(m, True) for m in gap]
        self.advance(0.5)
        self.assertEqual([m for m, _ in ide.messages[1:]], gap)
        self.assertNotIn("reconnected after", self.log())
        self.hub_factory.hubs[-1].sendMessage(v1_message("iopub", iso(self.clock.seconds() + 0.01), "new"), True)
        self.network.pump()
        self.assertIn("reconnected after 0.5 s; 3 messages replayed by the server, 0 held messages sent", self.log())

    def test_terminal_reconnect_log_line_has_no_replay_count(self) -> None:
        ide, _ = self.open_ide(TERMINAL_PATH)
        self.drop_hub()
        self.advance(0.5)
        self.assertIn("reconnected after 0.5 s; 0 held messages sent", self.log())
        self.assertIsNone(ide.closed)


class FakeStarter:
    """Managed mode's :class:`ServerStarter`: the server is stopped until the test says it runs."""

    timeout = 600.0

    def __init__(self) -> None:
        self.starts = 0
        self.running: Deferred = Deferred()

    def recover(self, code: int, location: bytes | None) -> Deferred:
        """As :meth:`ServerStarter.recover` for a stopped server: ``True`` once it runs."""
        self.starts += 1
        return self.running.addCallback(lambda _: True)


class ManagedReconnectTests(OutageTestCase):
    def test_a_stopped_server_is_started_then_the_socket_reconnects(self) -> None:
        starter = FakeStarter()
        self.make_relay(monotonic=self.clock.seconds, starter=starter)
        ide, _ = self.open_ide()
        self.drop_hub()

        def stopped(request):
            raise ConnectionDeny(424, "Failed Dependency")

        self.hub_factory.answer = stopped
        self.advance(1)
        self.assertEqual(starter.starts, 1)
        hubs = len(self.hub_factory.hubs)
        self.advance(30)  # the server takes its time; the IDE waits, no attempts meanwhile
        self.assertEqual(len(self.hub_factory.hubs), hubs)
        self.assertIsNone(ide.closed)
        self.hub_factory.answer = jupyter_answer
        starter.running.callback(None)
        self.network.pump()
        self.assertEqual(self.hub_factory.hubs[-1].state, WebSocketProtocol.STATE_OPEN)
        ide.sendMessage(b"after the restart", False)
        self.network.pump()
        self.assertEqual(self.hub_factory.hubs[-1].messages, [(b"after the restart", False)])
        self.assertIsNone(ide.closed)

    def test_a_failed_start_closes_the_ide_with_1011(self) -> None:
        starter = FakeStarter()
        self.make_relay(monotonic=self.clock.seconds, starter=starter)
        ide, _ = self.open_ide()
        self.drop_hub()
        self.hub_factory.answer = lambda request: (_ for _ in ()).throw(ConnectionDeny(424, "Failed Dependency"))
        self.advance(1)
        starter.running.errback(Refusal(503, "Your server failed to start: out of quota.", "spawn-failed"))
        self.network.pump()
        self.assertEqual(ide.closed[1:], (1011, "Restarting your server failed: Your server failed to start: out of quota."))
        self.assertEqual(self.relay.links, set())

    def test_the_ide_leaving_while_the_server_starts_ends_the_link_once_it_runs(self) -> None:
        starter = FakeStarter()
        self.make_relay(monotonic=self.clock.seconds, starter=starter)
        ide, _ = self.open_ide()
        self.drop_hub()
        self.hub_factory.answer = lambda request: (_ for _ in ()).throw(ConnectionDeny(424, "Failed Dependency"))
        self.advance(1)
        self.assertEqual(starter.starts, 1)
        ide.sendClose(1000)
        self.network.pump()
        starter.running.callback(None)
        self.network.pump()
        self.assertEqual(self.relay.links, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
