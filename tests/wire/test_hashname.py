"""Hashnames (telehash v3 hashname.md): vectors H1, H2, H3, K1, K3."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._crypto import (
    LocalIdentity,
    hashname_from_intermediates,
    hashname_from_keys,
    intermediate,
    is_hashname,
)
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.errors import MalformedPacket


def k(text: str) -> bytes:
    return b32decode(text)


def test_h1() -> None:
    keys = {
        "3a": k("eg3fxjnjkz763cjfnhyabeftyf75m2s4gll3gvmuacegax5h6nia"),
        "1a": k("an7lbl5e6vk4ql6nblznjicn5rmf3lmzlm"),
    }
    assert hashname_from_keys(keys) == "27ywx5e5ylzxfzxrhptowvwntqrd3jhksyxrfkzi6jfn64d3lwxa"


H2_3A = "hp6yglmmqwcbw5hno37uauh6fn6dx5oj7s5vtapaifrur2jv6zha"
H2_1A = "vgjz3yjb6cevxjomdleilmzasbj6lcc7"


def test_h2_both_keys() -> None:
    hn = hashname_from_keys({"3a": k(H2_3A), "1a": k(H2_1A)})
    assert hn == "jvdoio6kjvf3yqnxfvck43twaibbg4pmb7y3mqnvxafb26rqllwa"


def test_h2_only_1a() -> None:
    hn = hashname_from_keys({"1a": k(H2_1A)})
    assert hn == "echmb6eke2f6z2mqdwifrt6i6hkkfua7hiisgrms6pwttd6jubiq"


def test_h2_intermediates() -> None:
    assert (
        b32encode(intermediate(k(H2_1A))) == "ym7p66flpzyncnwkzxv2qk5dtosgnnstgfhw6xj2wvbvm7oz5oaq"
    )
    assert (
        b32encode(intermediate(k(H2_3A))) == "bmxelsxgecormqjlnati6chxqua7wzipxliw5le35ifwxlge2zva"
    )


def test_h2_key_plus_intermediate_equals_both_keys() -> None:
    # A link handshake carries one key plus the others' intermediates.
    hn = hashname_from_keys({"3a": k(H2_3A)}, {"1a": intermediate(k(H2_1A))})
    assert hn == "jvdoio6kjvf3yqnxfvck43twaibbg4pmb7y3mqnvxafb26rqllwa"
    only_im = hashname_from_intermediates(
        {
            "1a": k("ym7p66flpzyncnwkzxv2qk5dtosgnnstgfhw6xj2wvbvm7oz5oaq"),
            "3a": k("bmxelsxgecormqjlnati6chxqua7wzipxliw5le35ifwxlge2zva"),
        }
    )
    assert only_im == hn


def test_h2_3a_alone_from_hex() -> None:
    key = k(H2_3A)
    assert key.hex().startswith("3bfd832d") and key.hex().endswith("f64e")
    assert hashname_from_keys({"3a": key}) == "nzf4f6j7ylv53z3m4egrwltv2t2yks4rtpaimeg3avwqsoshqxba"


@pytest.mark.parametrize(
    ("key", "hashname"),
    [
        (
            "akndnx5kbansip6xphxymwckpqkjj26fcm",
            "5uegloufcyvnf34jausszmsabbfbcrg6fyxpcqzhddqxeefuapvq",
        ),
        (
            "apkoh54rkobkeela6d62hblhqd7grqd5dm",
            "fvifxlr3bsaan2jajo5qqn4au5ldy2ypiweazmuwjtgtg43tirkq",
        ),
    ],
)
def test_h3_cs1a_identities(key: str, hashname: str) -> None:
    assert hashname_from_keys({"1a": k(key)}) == hashname


def test_k1_hashname() -> None:
    a = LocalIdentity.from_cs3a(
        bytes.fromhex("627f107c4c86d0f81cf6ad345b2a41b8ea29ae111db199c0fed547358ecb4257"),
        bytes.fromhex("458fbd8b4964e29ed9f274c837055cc5f28ce37abe9cabf1869935c7a65da23b"),
    )
    assert a.hashname == "rprwonmelgqdotku77yscpd4h6pzwjlzri3cqsnybsbtktfxlvua"
    assert is_hashname(a.hashname)


def test_k3_c_fixture_pairs() -> None:
    a = LocalIdentity.from_cs3a(
        k("zgekyeqcjrgnat2dlmqn36fnucz6vk4uzz3funoi7jsfawthpfga"),
        k("krxnha4pbst2jhnps4vxiybrb6d5onn4mvufg6c766kgsd5eudnq"),
    )
    assert a.hashname == "6lpukn5zlljjcgvgulp3rqtc3yctln6lxjxu56hbs37dldgn6chq"
    # B's pair must belong together too (LocalIdentity checks secret -> public).
    LocalIdentity.from_cs3a(
        k("cufysukisshi5bpbsoshkbdx6s5k6qakakyfona6hfaxio3egjta"),
        k("3wbj6fd5wb2bljdqi4bwklcc5m5y2vrotk25ee4rywy37ngopffa"),
    )


@pytest.mark.parametrize(
    "bad",
    [{}, {"00": bytes(32)}, {"3A": bytes(32)}, {"zz": bytes(32)}, {"3": bytes(32)}],
)
def test_bad_csids(bad: dict[str, bytes]) -> None:
    with pytest.raises(MalformedPacket):
        hashname_from_keys(bad)


def test_bad_intermediate_size() -> None:
    with pytest.raises(MalformedPacket):
        hashname_from_intermediates({"3a": bytes(31)})


@pytest.mark.parametrize("text", ["", "x" * 52, "A" * 52, None, 5, "a" * 51])
def test_is_hashname_rejects(text: object) -> None:
    assert not is_hashname(text)


@given(st.binary(min_size=1, max_size=300), st.binary(min_size=1, max_size=300))
def test_order_independent(k1: bytes, k3: bytes) -> None:
    one = hashname_from_keys({"1a": k1, "3a": k3})
    assert one == hashname_from_keys({"3a": k3, "1a": k1})
    assert one == hashname_from_keys({"3a": k3}, {"1a": intermediate(k1)})
    assert is_hashname(one)
