"""
The relay masks and unmasks frames itself (``jds.relay_frames.xor_mask``) instead of through a
masker autobahn creates per frame: the bytes must be the ones autobahn's own masker makes, for every
length and every offset into a frame, and frames must cross the relay unchanged both ways, whole,
in pieces, fragmented, and as control frames.
"""

from __future__ import annotations

import random
from collections import deque
from itertools import pairwise

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol
from autobahn.websocket.xormasker import create_xor_masker
from test_relay import OTHER_PATH, RelayTestCase, Wire, frames
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from jds import relay_frames
from jds.relay_frames import MASK_BY_INT, HubSide, IdeSide, xor_mask

# every length up to a few frames' worth, the edges of the header's length forms and of MASK_BY_INT, and up to 70000
LENGTHS = sorted({
    *range(0, 260), 1023, 1024, 1025, 1500, 4095, 4096, 4097, 65535, 65536, 65537, 70000,
    *random.Random(22).sample(range(260, 70001), 60),
})


def autobahn_mask(payload: bytes, key: bytes, offset: int = 0) -> bytes:
    """What autobahn's masker gives for ``payload`` found ``offset`` bytes into a frame."""
    if not payload:
        return b""
    masker = create_xor_masker(key, offset + len(payload))
    masker.process(bytes(offset))
    return masker.process(payload)


class XorMaskTests(SynchronousTestCase):
    def test_the_same_bytes_as_autobahns_masker_for_every_length(self) -> None:
        rng = random.Random(4711)
        for size in LENGTHS:
            key, payload = rng.randbytes(4), rng.randbytes(size)
            masked = xor_mask(payload, key)
            self.assertEqual(masked, autobahn_mask(payload, key), f"{size} bytes")
            self.assertEqual(xor_mask(masked, key), payload, f"{size} bytes back")

    def test_offsets_into_a_frame(self) -> None:
        """A frame read in pieces: each piece unmasked where it starts, joined, is the frame unmasked."""
        rng = random.Random(1)
        for size in (5, 7, 130, MASK_BY_INT + 3, 9000):
            for offset in (*range(9), 1021, 4097):
                key, payload = rng.randbytes(4), rng.randbytes(size)
                self.assertEqual(xor_mask(payload, key, offset), autobahn_mask(payload, key, offset), (size, offset))
        key, whole = rng.randbytes(4), rng.randbytes(70000)
        for cuts in ([0, 1, 2, 3, 70000], [0, 1023, 1025, 5000, 69999, 70000], sorted({0, 70000, *rng.sample(range(70000), 40)})):
            pieces = [xor_mask(whole[a:b], key, a) for a, b in pairwise(cuts)]
            self.assertEqual(b"".join(pieces), xor_mask(whole, key), cuts[:6])

    def test_memoryview_and_bytearray_payloads(self) -> None:
        key, payload = b"\x01\x02\x03\x04", bytes(range(200))
        self.assertEqual(xor_mask(memoryview(payload), key), xor_mask(payload, key))
        self.assertEqual(xor_mask(bytearray(payload), key), xor_mask(payload, key))


def _open_client(protocol_class: type, factory_class: type = WebSocketClientFactory) -> tuple[WebSocketClientProtocol, StringTransport]:
    """A client protocol of ``protocol_class`` as an open socket has it, writing into a StringTransport."""
    factory = factory_class("ws://127.0.0.1:9/")
    protocol = protocol_class()
    protocol.factory = factory
    for name in protocol.CONFIG_ATTRS:
        setattr(protocol, name, getattr(factory, name))
    protocol.trafficStats = TrafficStats()
    protocol.send_queue = deque()
    protocol.state = WebSocketProtocol.STATE_OPEN
    protocol.transport = StringTransport()
    return protocol, protocol.transport


class _SameFramesAsAutobahn:
    """Shared by both sides' framing tests: every length, text, continuation, reserved bits, control frames."""

    seed = 0

    def assertSameFrame(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> None:
        raise NotImplementedError

    def test_data_frames_of_every_length(self) -> None:
        rng = random.Random(self.seed)
        for size in LENGTHS:
            self.assertSameFrame(2, rng.randbytes(size))
        self.assertSameFrame(1, "caf\u00e9".encode())
        self.assertSameFrame(0, b"continued", fin=False)
        self.assertSameFrame(2, b"reserved bits", rsv=4)

    def test_control_frames(self) -> None:
        for opcode, payload in ((8, b"\x03\xe8bye"), (8, b""), (9, b"ping"), (10, b"pong" * 31), (9, b"")):
            self.assertSameFrame(opcode, payload)


class HubSideFramingTests(_SameFramesAsAutobahn, SynchronousTestCase):
    """The hub side's frames are byte for byte autobahn's, the random key included."""

    seed = 7

    def assertSameFrame(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> None:
        ours, our_wire = _open_client(HubSide)
        theirs, their_wire = _open_client(WebSocketClientProtocol)
        random.seed(len(payload) * 31 + opcode)
        ours.sendFrame(opcode, payload, fin, rsv)
        random.seed(len(payload) * 31 + opcode)
        theirs.sendFrame(opcode, payload, fin, rsv)
        self.assertEqual(our_wire.value(), their_wire.value(), (opcode, len(payload), fin, rsv))
        self.assertEqual(ours.trafficStats.outgoingWebSocketFrames, theirs.trafficStats.outgoingWebSocketFrames)

    def test_what_autobahns_own_options_ask_for_goes_to_autobahn(self) -> None:
        """A given key (fuzzers), no masking (a test option) and frame logging take autobahn's path."""
        ours, wire = _open_client(HubSide)
        ours.sendFrame(2, b"abcd", mask=b"\x00\x00\x00\x00")
        self.assertEqual(wire.value(), b"\x82\x84abcd")  # autobahn leaves a given key off the wire
        wire.clear()
        ours.applyMask = False
        ours.sendFrame(2, b"abcd")
        self.assertEqual(wire.value()[-4:], b"abcd")
        self.assertTrue(wire.value()[1] & 0x80)


class IdeSideFramingTests(_SameFramesAsAutobahn, SynchronousTestCase):
    """The IDE side's (unmasked) frames are byte for byte autobahn's."""

    seed = 8

    def assertSameFrame(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> None:
        ours, our_wire = _open_client(IdeSide, WebSocketServerFactory)
        theirs, their_wire = _open_client(WebSocketServerProtocol, WebSocketServerFactory)
        ours.sendFrame(opcode, payload, fin, rsv)
        theirs.sendFrame(opcode, payload, fin, rsv)
        self.assertEqual(our_wire.value(), their_wire.value(), (opcode, len(payload), fin, rsv))
        self.assertEqual(ours.trafficStats.outgoingWebSocketFrames, theirs.trafficStats.outgoingWebSocketFrames)

    def test_what_autobahns_own_options_ask_for_goes_to_autobahn(self) -> None:
        """Masked server frames (a test option) and a given key take autobahn's path."""
        ours, wire = _open_client(IdeSide, WebSocketServerFactory)
        ours.maskServerFrames = True
        ours.applyMask = True
        ours.sendFrame(2, b"abcd")
        self.assertTrue(wire.value()[1] & 0x80)
        self.assertEqual(len(wire.value()), 2 + 4 + 4)
        wire.clear()
        ours.maskServerFrames = False
        ours.sendFrame(2, b"abcd", mask=b"\x00\x00\x00\x00")
        self.assertEqual(wire.value(), b"\x82\x84abcd")


class RelayedMaskingTests(RelayTestCase):
    """Through the relay: the IDE's masked frames arrive unmasked at the hub, in any cut."""

    def test_messages_of_every_length_both_ways(self) -> None:
        ide, proxy_end = self.open_ide()
        rng = random.Random(3)
        sent = [(rng.randbytes(size), size % 2 == 0) for size in LENGTHS[::3]]
        for payload, binary in sent:
            if not binary:
                payload = payload.hex().encode()
            ide.sendMessage(payload, binary)
            self.network.pump()
        expected = [(p if b else p.hex().encode(), b) for p, b in sent]
        self.assertEqual(self.hub.messages, expected)
        self.hub.factory.echo = True
        for payload, binary in expected[:40]:
            self.hub.sendMessage(payload, binary)
        self.network.pump()
        self.assertEqual(ide.messages, expected[:40])

    def test_a_frame_read_a_few_bytes_at_a_time(self) -> None:
        """The IDE's bytes reach the relay cut anywhere, also inside the header and the key."""
        ide, proxy_end = self.open_ide()
        hub_end = self.hub.transport.other
        mark = len(hub_end.writes)
        payload = random.Random(5).randbytes(3000)
        ide.sendMessage(payload, True)
        wire: Wire = ide.transport
        data = wire.value()
        wire.clear()
        at = 0
        for step in (1, 1, 1, 2, 3, 5, 7, 11, 13, 17, 64, 1000, 1):
            proxy_end.protocol.dataReceived(data[at:at + step])
            at += step
        proxy_end.protocol.dataReceived(data[at:])
        self.network.pump()
        self.assertEqual(self.hub.messages, [(payload, True)])
        self.assertEqual(b"".join(p for _, _, p in frames(b"".join(hub_end.writes[mark:]))), payload)

    def test_a_frame_in_pieces_goes_on_unmasked_right(self) -> None:
        """Each piece of a large frame is a frame of its own on the hub side, unmasked from where it starts."""
        self.patch(relay_frames, "FRAME_PIECE", 1)
        ide, _ = self.open_ide()
        hub_end = self.hub.transport.other
        mark = len(hub_end.writes)
        rng = random.Random(9)
        pieces = [rng.randbytes(n) for n in (1, 3, 1022, 2, 4097, 5)]
        ide.beginMessage(isBinary=True)
        ide.beginMessageFrame(sum(map(len, pieces)))
        for piece in pieces:
            ide.sendMessageFrameData(piece)
            self.network.pump()
        ide.endMessage()
        self.network.pump()
        got = [p for _, _, p in frames(b"".join(hub_end.writes[mark:]))]
        self.assertEqual(got[:len(pieces)], pieces)
        self.assertEqual(self.hub.messages, [(b"".join(pieces), True)])

    def test_fragmented_text_is_validated_unmasked(self) -> None:
        """UTF-8 is checked on the unmasked bytes: a character split over two frames passes."""
        ide, _ = self.open_ide()
        ide.beginMessage(isBinary=False)
        for piece in ("caf\u00e9 \u20ac".encode()[:5], "caf\u00e9 \u20ac".encode()[5:8], "caf\u00e9 \u20ac".encode()[8:]):
            ide.sendMessageFrame(piece)
        ide.endMessage()
        self.network.pump()
        self.assertEqual(self.hub.messages, [("caf\u00e9 \u20ac".encode(), False)])
        self.assertIsNone(ide.closed)

    def test_invalid_utf8_from_the_ide_is_still_1007(self) -> None:
        ide, _ = self.open_ide(OTHER_PATH)
        ide.sendMessage(b"\xff\xfe", False)
        self.network.pump()
        self.assertEqual(ide.closed[1], 1007)
        self.assertEqual(self.hub.closed[1:], (1011, "The IDE broke the WebSocket protocol."))

    def test_ping_pong_and_close_from_the_ide(self) -> None:
        ide, _ = self.open_ide(OTHER_PATH)
        pongs: list[bytes] = []
        ide.onPong = pongs.append
        ide.sendPing(b"masked ping payload")
        self.network.pump()
        self.assertEqual(pongs, [b"masked ping payload"])
        ide.sendClose(4001, "done \u00e9")
        self.network.pump()
        self.assertEqual(self.hub.closed[1:], (4001, "done \u00e9"))
        self.assertEqual(ide.closed[1], 4001)
