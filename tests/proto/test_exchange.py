"""E3X exchange (telehash v3 e3x/exchange.md, handshake.md, order.md) over CS3a."""

from __future__ import annotations

from typing import Any

import pytest

from p2pcloud import _crypto
from p2pcloud._crypto import LocalIdentity, intermediate
from p2pcloud._wire import b32encode, decode_packet, encode_packet
from p2pcloud.errors import HandshakeFailed, LocalProtocolError, MalformedPacket
from p2pcloud.proto.exchange import (
    HANDSHAKE_RESENDS,
    HANDSHAKE_TIMEOUT,
    KEEPALIVE_UDP,
    MAX_CHANNEL_ID,
    Exchange,
    Handshake,
    HandshakeVerdict,
    channel_token,
    open_handshake,
)
from tests.wire._support import CountingEntropy, ScriptedEntropy, identity, load_d1

D1 = load_d1()


def body_of(packet: bytes) -> bytes:
    p = decode_packet(packet)
    assert p.head == b"\x3a"
    return p.body


def deliver(sender_packet: bytes, receiver: Exchange) -> HandshakeVerdict:
    hs = open_handshake(receiver.local, body_of(sender_packet))
    return receiver.receive_handshake(hs)


def pump(x: Exchange, y: Exchange, first: bytes) -> int:
    """Deliver ``first`` (from x) to y, then answer every reply until both are quiet."""
    queue: list[tuple[bytes, Exchange]] = [(first, y)]
    rounds = 0
    while queue:
        rounds += 1
        assert rounds < 20, "peers never went quiet"
        packet, to = queue.pop(0)
        verdict = deliver(packet, to)
        if verdict.reply_at is not None:
            other = x if to is y else y
            queue.append((to.handshake(verdict.reply_at), other))
    return rounds


def make_pair(label: str = "") -> tuple[Exchange, Exchange]:
    a, b = identity("a" + label), identity("b" + label)
    return (
        Exchange(a, b.cs3a_public, CountingEntropy("xa" + label)),
        Exchange(b, a.cs3a_public, CountingEntropy("xb" + label)),
    )


def linked_pair(label: str = "") -> tuple[Exchange, Exchange]:
    xa, xb = make_pair(label)
    pump(xa, xb, xa.handshake(xa.new_at(1_700_000_000)))
    assert xa.is_ready() and xb.is_ready()
    return xa, xb


def forge(
    sender: LocalIdentity,
    recipient_pk: bytes,
    inner: bytes,
    *,
    auth_sender: LocalIdentity | None = None,
    eph_seed: str = "forge",
) -> bytes:
    """A handshake body built from primitives (to send what JS or C or an attacker send)."""
    e_pk, e_sk = _crypto.cs3a_keypair(CountingEntropy(eph_seed))
    auth_by = auth_sender or sender
    return _crypto.message_encrypt(
        inner,
        eph_public=e_pk,
        box_key=_crypto.beforenm(recipient_pk, e_sk),
        auth_key=_crypto.auth_secret(recipient_pk, auth_by.cs3a_secret),
        nonce=bytes(24),
    )


def link_inner(head: dict[str, Any], key: bytes, attached: dict[str, Any] | None = None) -> bytes:
    return encode_packet(head, encode_packet(attached, key))


# -- vector D1 through the Exchange API -----------------------------------------------------


def test_d1_whole_exchange_reproduces() -> None:
    a = LocalIdentity.from_cs3a(D1["A_pk"], D1["A_sk"])
    b = LocalIdentity.from_cs3a(D1["B_pk"], D1["B_sk"])
    ent_a = ScriptedEntropy(D1["eA_sk"], bytes(range(24)), bytes(range(48, 72)))
    ent_b = ScriptedEntropy(D1["eB_sk"], bytes(range(24, 48)))
    xa = Exchange(a, b.cs3a_public, ent_a)
    xb = Exchange(b, a.cs3a_public, ent_b)
    assert xa.ephemeral == D1["eA_pk"] and xb.ephemeral == D1["eB_pk"]
    assert xa.token == D1["tokenA"] and xb.token == D1["tokenB"]
    assert xa.is_odd and not xb.is_odd  # A's key 627f.. > B's 3d60..

    outer_ab = xa.handshake(1)
    assert outer_ab == D1["outerAB"]
    hs = open_handshake(b, body_of(outer_ab))
    assert hs.json == {"type": "link", "at": 1, "csid": "3a"}
    assert hs.hashname == a.hashname and hs.key == D1["A_pk"] and hs.ephemeral == D1["eA_pk"]
    verdict = xb.receive_handshake(hs)
    assert verdict == HandshakeVerdict(current=True, new_session=True, reply_at=1, at=1)

    outer_ba = xb.handshake(verdict.reply_at)
    assert outer_ba == D1["outerBA"]
    verdict_a = xa.receive_handshake(
        open_handshake(a, body_of(outer_ba), expected_key=b.cs3a_public)
    )
    assert verdict_a == HandshakeVerdict(current=True, new_session=True, reply_at=None, at=1)
    assert xa.remote_token == D1["tokenB"] and xb.remote_token == D1["tokenA"]

    chan = xa.encrypt_channel(D1["chan_inner"])
    assert chan == D1["chanAB"]
    assert channel_token(decode_packet(chan).body) == xb.token
    assert xb.decrypt_channel(decode_packet(chan).body) == D1["chan_inner"]
    assert ent_a.left == 0 and ent_b.left == 0


def test_d1_inner_ab_is_what_handshake_encrypts() -> None:
    a = LocalIdentity.from_cs3a(D1["A_pk"], D1["A_sk"])
    b = LocalIdentity.from_cs3a(D1["B_pk"], D1["B_sk"])
    _eph, inner = _crypto.message_decrypt(body_of(D1["outerAB"]), b.cs3a_secret)
    assert inner == D1["innerAB"]
    assert a.hashname == "rprwonmelgqdotku77yscpd4h6pzwjlzri3cqsnybsbtktfxlvua"


# -- two exchanges ------------------------------------------------------------------------


def test_two_exchanges_link_and_agree_on_order() -> None:
    xa, xb = linked_pair()
    assert xa.is_odd != xb.is_odd
    assert xa.is_odd == (xa.local.cs3a_public > xb.local.cs3a_public)
    assert xa.remote_hashname == xb.local.hashname and xb.remote_hashname == xa.local.hashname
    assert xa.at == xb.at
    odd, even = (xa, xb) if xa.is_odd else (xb, xa)
    assert [odd.next_channel_id() for _ in range(3)] == [1, 3, 5]
    assert [even.next_channel_id() for _ in range(3)] == [2, 4, 6]
    assert odd.is_ours(7) and not odd.is_ours(8) and even.is_ours(8)
    for inner in (b"", b"\x00\x00", bytes(1400), bytes(65536)):
        assert xb.decrypt_channel(decode_packet(xa.encrypt_channel(inner)).body) == inner
        assert xa.decrypt_channel(decode_packet(xb.encrypt_channel(inner)).body) == inner


def test_handshake_sizes() -> None:
    xa, _ = make_pair()
    at = xa.new_at(100)
    packet = xa.handshake(at)
    inner = encode_packet({"type": "link", "at": at, "csid": "3a"}, encode_packet(None, bytes(32)))
    assert len(packet) == 3 + 88 + len(inner) == 163  # LOB+CSID, CS3a overhead, inner


def test_the_side_that_starts_is_ready_after_one_reply() -> None:
    xa, xb = make_pair("r")
    v = deliver(xa.handshake(xa.new_at(1000)), xb)
    assert v.new_session and xb.is_ready()
    v2 = deliver(xb.handshake(v.reply_at), xa)
    assert v2.new_session and xa.is_ready() and v2.reply_at is None


# -- at rules -------------------------------------------------------------------------------


def test_at_parity_and_new_at() -> None:
    xa, xb = make_pair("p")
    odd, even = (xa, xb) if xa.is_odd else (xb, xa)
    assert odd.new_at(1000.7) % 2 == 1 and odd.new_at(1000.7) >= 1000
    assert even.new_at(1000.7) % 2 == 0 and even.new_at(1000.7) >= 1000
    odd.handshake(5001)
    assert odd.at == 5001 and odd.new_at(10) == 5003  # above best even when the clock is behind
    even.handshake(7)  # the peer's parity, not an echo: bumped to ours
    assert even.at == 8


def test_higher_at_is_echoed_equal_is_in_sync() -> None:
    xa, xb = make_pair("e")
    odd, even = (xa, xb) if xa.is_odd else (xb, xa)
    v = deliver(odd.handshake(101), even)
    assert v.reply_at == 101 and v.current and even.at == 101
    v = deliver(even.handshake(v.reply_at), odd)
    assert v.reply_at is None and v.current
    # a keepalive with a higher at is echoed, so the sender learns the peer is alive
    v = deliver(even.handshake(even.new_at(200)), odd)
    assert v.reply_at == 200 and odd.at == 200
    v = deliver(odd.handshake(v.reply_at), even)
    assert v == HandshakeVerdict(current=True, new_session=False, reply_at=None, at=200)


def test_lower_at_gets_our_best() -> None:
    xa, xb = make_pair("l")
    odd, even = (xa, xb) if xa.is_odd else (xb, xa)
    odd_first = odd.handshake(101)
    even_first = even.handshake(500)
    v = deliver(odd_first, even)  # 101 < 500: stale, answer with 500
    assert v.reply_at == 500 and not v.current and even.at == 500
    assert v.new_session  # no session yet: the first verified ephemeral is taken
    v = deliver(even_first, odd)
    assert v.reply_at == 500 and v.current
    assert pump(odd, even, odd.handshake(v.reply_at)) == 1
    assert odd.at == even.at == 500


def test_even_side_rejects_even_at_from_odd_peer() -> None:
    # telehash-js: "if(inner.json.at % 2 === 0 && x.order == 2) return false" (re-handshake).
    xa, xb = make_pair("j")
    odd, even = (xa, xb) if xa.is_odd else (xb, xa)
    even.handshake(400)
    bogus = forge(
        odd.local,
        even.local.cs3a_public,
        link_inner({"type": "link", "at": 402, "csid": "3a"}, odd.local.cs3a_public),
    )
    v = even.receive_handshake(open_handshake(even.local, bogus))
    assert v.reply_at == 400 and not v.current and even.at == 400


def test_equal_echo_of_even_at_is_in_sync() -> None:
    xa, xb = make_pair("q")
    odd, even = (xa, xb) if xa.is_odd else (xb, xa)
    v = deliver(even.handshake(400), odd)
    assert v.reply_at == 400
    v = deliver(odd.handshake(400), even)  # the ODD side echoes an even at
    assert v.reply_at is None and v.current


# -- sessions -------------------------------------------------------------------------------


def test_new_session_detected_and_channel_floor_reset() -> None:
    xa, xb = linked_pair("s")
    xa.next_channel_id()
    xa.next_channel_id()
    old = xb.encrypt_channel(b"before restart")
    # B restarts: same identity, new exchange, new ephemeral key, later at.
    xb2 = Exchange(xb.local, xa.local.cs3a_public, CountingEntropy("xb restarted"))
    v = deliver(xb2.handshake(xb2.new_at(1_700_000_100)), xa)
    assert v.new_session and v.current and v.reply_at is not None
    assert xa.next_channel_id() == (1 if xa.is_odd else 2)
    deliver(xa.handshake(v.reply_at), xb2)
    assert xb2.decrypt_channel(decode_packet(xa.encrypt_channel(b"hi")).body) == b"hi"
    with pytest.raises(HandshakeFailed):
        xa.decrypt_channel(decode_packet(old).body)  # old session's token and key


def test_same_session_resend_is_not_new() -> None:
    xa, xb = make_pair("u")
    first = xa.handshake(xa.new_at(10))
    assert deliver(first, xb).new_session
    v = deliver(first, xb)  # resent unchanged (the 1/3/7/15 s schedule)
    assert not v.new_session and v.reply_at is None


def test_replayed_old_session_handshake_fails() -> None:
    xa, xb = linked_pair("x")
    old_handshake = xb.handshake()
    xb2 = Exchange(xb.local, xa.local.cs3a_public, CountingEntropy("xb second life"))
    v = deliver(xb2.handshake(xb2.new_at(1_700_000_200)), xa)
    assert v.new_session
    token_before = xa.remote_token
    with pytest.raises(HandshakeFailed, match="replay"):
        deliver(old_handshake, xa)
    assert xa.remote_token == token_before


def test_stale_new_ephemeral_waits_for_echo() -> None:
    xa, xb = linked_pair("w")
    # B restarts with its clock far behind: its at is below what A has seen.
    xb2 = Exchange(xb.local, xa.local.cs3a_public, CountingEntropy("xb clock behind"))
    v = deliver(xb2.handshake(xb2.new_at(5)), xa)
    assert not v.new_session and not v.current and v.reply_at == xa.at
    v2 = deliver(xa.handshake(v.reply_at), xb2)  # xb2 adopts the higher at and echoes
    assert v2.reply_at == xa.at
    v3 = deliver(xb2.handshake(v2.reply_at), xa)
    assert v3.new_session and v3.reply_at is None


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 31, 32, 55, 56, 70, -17, -16, -1])
def test_altered_handshake_fails(offset: int) -> None:
    xa, xb = make_pair("alt")
    body = bytearray(body_of(xa.handshake(xa.new_at(50))))
    body[offset] ^= 0x04
    with pytest.raises(HandshakeFailed):
        open_handshake(xb.local, bytes(body))


def test_handshake_for_someone_else_fails() -> None:
    xa, _ = make_pair("else")
    with pytest.raises(HandshakeFailed):
        open_handshake(identity("carol"), body_of(xa.handshake(xa.new_at(50))))


def test_handshake_from_other_key_rejected_by_exchange() -> None:
    xa, xb = make_pair("k")
    carol = identity("carol")
    xc = Exchange(carol, xb.local.cs3a_public, CountingEntropy("xc"))
    hs = open_handshake(xb.local, body_of(xc.handshake(xc.new_at(50))))
    assert hs.hashname == carol.hashname
    with pytest.raises(HandshakeFailed):
        xb.receive_handshake(hs)
    with pytest.raises(HandshakeFailed):
        open_handshake(xb.local, body_of(xc.handshake()), expected_key=xa.local.cs3a_public)


def test_forged_attached_key_fails_auth() -> None:
    # Mallory attaches Alice's key but can only compute AUTH with her own static key.
    _xa, xb = make_pair("f")
    alice, mallory = _xa.local, identity("mallory")
    body = forge(
        alice,
        xb.local.cs3a_public,
        link_inner({"type": "link", "at": 9}, alice.cs3a_public),
        auth_sender=mallory,
    )
    with pytest.raises(HandshakeFailed):
        open_handshake(xb.local, body)


def test_channel_failures() -> None:
    xa, xb = linked_pair("c")
    body = bytearray(decode_packet(xa.encrypt_channel(b"payload")).body)
    wrong_token = bytes(16) + bytes(body[16:])
    with pytest.raises(HandshakeFailed):
        xb.decrypt_channel(wrong_token)
    body[-3] ^= 0x10
    with pytest.raises(HandshakeFailed):
        xb.decrypt_channel(bytes(body))
    with pytest.raises(MalformedPacket):
        xb.decrypt_channel(bytes(55))
    with pytest.raises(MalformedPacket):
        channel_token(bytes(10))
    # a packet for the other direction (our own token) does not decrypt with our key
    own = decode_packet(xb.encrypt_channel(b"x")).body
    with pytest.raises(HandshakeFailed):
        xb.decrypt_channel(own)


def test_channel_before_session() -> None:
    xa, xb = make_pair("n")
    with pytest.raises(LocalProtocolError):
        xa.encrypt_channel(b"x")
    with pytest.raises(HandshakeFailed):
        xa.decrypt_channel(xa.token + bytes(60))


def test_misuse() -> None:
    me = identity("me")
    with pytest.raises(LocalProtocolError):
        Exchange(me, me.cs3a_public, CountingEntropy("self"))
    with pytest.raises(LocalProtocolError):
        Exchange(me, bytes(31), CountingEntropy("short"))
    with pytest.raises(HandshakeFailed):
        Exchange(me, bytes(32), CountingEntropy("low order"))
    xa, _ = make_pair("m")
    with pytest.raises(LocalProtocolError):
        xa.handshake()  # no at yet
    with pytest.raises(LocalProtocolError):
        xa.handshake(0)


def test_channel_ids_run_out() -> None:
    xa, _ = make_pair("ids")
    last = MAX_CHANNEL_ID if xa.is_odd else MAX_CHANNEL_ID - 1  # 2**32-1 is odd
    xa._next_cid = last  # skip four billion allocations
    assert xa.next_channel_id() == last
    with pytest.raises(LocalProtocolError):
        xa.next_channel_id()


# -- what JS and C put in handshakes --------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "attached"),
    [
        ({"type": "link", "at": 11}, {"3a": None}),  # telehash-js
        ({"type": "link", "at": 11, "csid": "3a"}, {"3a": True}),  # telehash-c
        ({"at": 11}, None),  # a missing type means link
        ({"type": "key", "at": 11}, None),  # the old form JS upgrades
    ],
)
def test_js_and_c_handshake_forms(head: dict[str, Any], attached: dict[str, Any] | None) -> None:
    a, b = identity("js a"), identity("js b")
    body = forge(a, b.cs3a_public, link_inner(head, a.cs3a_public, attached))
    hs = open_handshake(b, body)
    assert hs.type == "link" and hs.at == 11 and hs.hashname == a.hashname
    assert isinstance(hs, Handshake)


def test_intermediates_feed_the_hashname() -> None:
    a, b = identity("multi a"), identity("multi b")
    key_1a = bytes(range(21))
    attached = {"1a": b32encode(intermediate(key_1a)), "3a": None}
    body = forge(a, b.cs3a_public, link_inner({"type": "link", "at": 3}, a.cs3a_public, attached))
    hs = open_handshake(b, body)
    expected = _crypto.hashname_from_keys({"3a": a.cs3a_public, "1a": key_1a})
    assert hs.hashname == expected and hs.intermediates == {"1a": intermediate(key_1a)}
    x = Exchange(b, a.cs3a_public, CountingEntropy("m"), remote_intermediates=hs.intermediates)
    assert x.remote_hashname == expected


MAL_A, MAL_B = identity("mal a"), identity("mal b")
KEY = MAL_A.cs3a_public


@pytest.mark.parametrize(
    "inner",
    [
        encode_packet(None, b"\x00\x00"),  # no JSON head
        encode_packet({"type": "link", "at": "11"}, encode_packet(None, KEY)),
        encode_packet({"type": "link", "at": 0}, encode_packet(None, KEY)),
        encode_packet({"type": "link", "at": True}, encode_packet(None, KEY)),
        encode_packet({"type": "link", "at": 2**53}, encode_packet(None, KEY)),
        encode_packet({"type": "link", "at": 1, "csid": "1a"}, encode_packet(None, KEY)),
        encode_packet({"type": 5, "at": 1}, encode_packet(None, KEY)),
        encode_packet({"type": "link", "at": 1}, encode_packet(None, KEY[:31])),
        encode_packet({"type": "link", "at": 1}, encode_packet(b"\x01", KEY)),
        encode_packet({"type": "link", "at": 1}, encode_packet({"1a": 5}, KEY)),
        encode_packet({"type": "link", "at": 1}, encode_packet({"1a": "mzxw6"}, KEY)),
        encode_packet({"type": "link", "at": 1}, encode_packet({"1": "mzxw6"}, KEY)),
        encode_packet({"type": "link", "at": 1}, b"\xff"),
    ],
)
def test_malformed_inner_packets(inner: bytes) -> None:
    with pytest.raises(MalformedPacket):
        open_handshake(MAL_B, forge(MAL_A, MAL_B.cs3a_public, inner))


def test_other_handshake_types_refused() -> None:
    a, b = identity("t a"), identity("t b")
    inner = link_inner({"type": "jwt", "at": 1}, a.cs3a_public)
    with pytest.raises(HandshakeFailed):
        open_handshake(b, forge(a, b.cs3a_public, inner))


def test_handshake_too_large() -> None:
    with pytest.raises(MalformedPacket):
        open_handshake(identity("big"), bytes(5000))


def test_schedule_constants_for_the_mesh() -> None:
    assert HANDSHAKE_RESENDS == (1, 3, 7, 15)
    assert HANDSHAKE_TIMEOUT == 30 and KEEPALIVE_UDP == 30
