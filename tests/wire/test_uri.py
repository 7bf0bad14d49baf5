"""Link URIs (telehash v3 uri.md): format, parse, and clear BadURI errors."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._crypto import hashname_from_keys
from p2pcloud._wire import b32encode
from p2pcloud.errors import BadURI
from p2pcloud.uri import DEFAULT_PORT, MAX_URI, LinkInfo, format_link_uri, parse_link_uri
from tests.wire._support import identity, load_d1

ME = identity("uri")
KEY = b32encode(ME.cs3a_public)


def test_round_trip_with_paths() -> None:
    paths = [
        {"type": "udp4", "ip": "127.0.0.1", "port": 4242},
        {"type": "tcp4", "ip": "127.0.0.1", "port": 4243},
        {"type": "peer", "hn": ME.hashname},
    ]
    uri = format_link_uri(ME, paths)
    assert uri.startswith("link://127.0.0.1:4242/?cs3a=" + KEY + "&paths=")
    info = parse_link_uri(uri)
    assert info == LinkInfo(
        hashname=ME.hashname,
        keys={"3a": ME.cs3a_public},
        paths=paths,
        host="127.0.0.1",
        port=4242,
    )


def test_minimal_uri_and_default_port() -> None:
    uri = format_link_uri(ME)
    assert uri == f"link://localhost/?cs3a={KEY}"
    info = parse_link_uri(uri)
    assert info.port == DEFAULT_PORT and info.paths == [] and info.hashname == ME.hashname


def test_host_becomes_udp4_path() -> None:
    info = parse_link_uri(f"link://127.0.0.1:5000/?cs3a={KEY}")
    assert info.paths == [{"type": "udp4", "ip": "127.0.0.1", "port": 5000}]


def test_hashname_matches_d1_vector() -> None:
    d1 = load_d1()
    info = parse_link_uri(f"link://127.0.0.1/?cs3a={b32encode(d1['A_pk'])}")
    assert info.hashname == "rprwonmelgqdotku77yscpd4h6pzwjlzri3cqsnybsbtktfxlvua"


def test_other_cipher_sets_feed_the_hashname() -> None:
    key_1a = bytes(range(21))
    info = parse_link_uri(f"link://h/?cs1a={b32encode(key_1a)}&cs3a={KEY}")
    assert info.hashname == hashname_from_keys({"1a": key_1a, "3a": ME.cs3a_public})


def test_custom_scheme() -> None:
    uri = format_link_uri(ME, scheme="p2pcloud")
    assert parse_link_uri(uri, scheme="p2pcloud").hashname == ME.hashname
    with pytest.raises(BadURI, match="expected a link://"):
        parse_link_uri(uri)


def test_single_path_object_accepted() -> None:
    one = b32encode(b'{"type":"udp4","ip":"127.0.0.1","port":1}')
    info = parse_link_uri(f"link://h/?cs3a={KEY}&paths={one}")
    assert info.paths == [{"type": "udp4", "ip": "127.0.0.1", "port": 1}]


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("http://h/?cs3a=" + KEY, "expected a link://"),
        ("link://h/", "no cs3a key"),
        ("link://h/?cs3a=" + KEY[:-1], "base32"),
        ("link://h/?cs3a=" + KEY[:-4], "wrong length"),
        ("link://h/?cs3a=" + KEY + "&cs3a=" + KEY, "twice"),
        ("link://h/?cs3a=" + KEY + "&paths=xyz!", "base32"),
        ("link://h/?cs3a=" + KEY + "&paths=" + b32encode(b"not json"), "JSON"),
        ("link://h/?cs3a=" + KEY + "&paths=" + b32encode(b"[1]"), "type"),
        ("link://h:99999/?cs3a=" + KEY, "does not parse"),
        ("link://h:0/?cs3a=" + KEY, "port 0"),
        ("link://u:p@h/?cs3a=" + KEY, "user"),
        ("link://h/?cs3a=" + KEY + " ", "spaces"),
        ("link://h/?cs3a=" + "a" * MAX_URI, "longer"),
    ],
)
def test_bad_uris_say_why(uri: str, says: str) -> None:
    with pytest.raises(BadURI, match=says):
        parse_link_uri(uri)


def test_format_rejects_bad_input() -> None:
    with pytest.raises(BadURI):
        format_link_uri(ME, port=0, host="h")
    with pytest.raises(BadURI):
        format_link_uri(ME, host="a/b")
    with pytest.raises(BadURI):
        format_link_uri(ME, scheme="Bad Scheme")


@given(
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["udp4", "tcp4", "peer"]), "port": st.integers(1, 65535)}
        ),
        max_size=5,
    ),
    st.integers(1, 65535),
)
def test_round_trip_property(paths: list[dict[str, object]], port: int) -> None:
    info = parse_link_uri(format_link_uri(ME, paths, host="example.org", port=port))
    assert info.paths == paths and info.port == port and info.hashname == ME.hashname


@given(st.text(max_size=300))
def test_parser_raises_only_bad_uri(text: str) -> None:
    with contextlib.suppress(BadURI):
        parse_link_uri(text)


@given(st.data())
def test_mutated_uris_raise_only_bad_uri(data: st.DataObject) -> None:
    uri = list(format_link_uri(ME, [{"type": "udp4", "ip": "127.0.0.1", "port": 9}]))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(uri) - 1))
        uri[i] = data.draw(st.characters(codec="ascii"))
    try:
        info = parse_link_uri("".join(uri))
    except BadURI:
        return
    assert info.hashname == hashname_from_keys(info.keys)
