"""Base32 (telehash v3 base32.md): the implementers' guide fixtures and strictness."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pcloud._wire import MAX_B32_TEXT, b32decode, b32encode
from p2pcloud.errors import MalformedPacket

# SPEC:v3/guides/implementers.md "Test Fixtures (hex <=> base32)".
_FOO = "666f6f626172626178"
_FOO_B32 = [
    "",
    "my",
    "mzxq",
    "mzxw6",
    "mzxw6yq",
    "mzxw6ytb",
    "mzxw6ytboi",
    "mzxw6ytbojra",
    "mzxw6ytbojrgc",
    "mzxw6ytbojrgc6a",
]
_LONG = "9fa9e0379247cad2d395ad7e61c215ad32f768382cd44cf03f5f5ae780884a98"
_LONG_B32 = [
    "t4",
    "t6uq",
    "t6u6a",
    "t6u6any",
    "t6u6an4s",
    "t6u6an4si4",
    "t6u6an4si7fa",
    "t6u6an4si7fne",
    "t6u6an4si7fnfuy",
    "t6u6an4si7fnfu4v",
    "t6u6an4si7fnfu4vvu",
    "t6u6an4si7fnfu4vvv7a",
    "t6u6an4si7fnfu4vvv7gc",
    "t6u6an4si7fnfu4vvv7gdqq",
    "t6u6an4si7fnfu4vvv7gdqqv",
    "t6u6an4si7fnfu4vvv7gdqqvvu",
    "t6u6an4si7fnfu4vvv7gdqqvvuza",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2a",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2by",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byfq",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftka",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkey",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4a",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7l4",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7l5na",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7l5noo",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7l5nopaa",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7l5nopaei",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7l5nopaeiji",
    "t6u6an4si7fnfu4vvv7gdqqvvuzpo2byftkez4b7l5nopaeijkma",
]
FIXTURES = [(_FOO[: 2 * i], text) for i, text in enumerate(_FOO_B32)] + [
    (_LONG[: 2 * (i + 1)], text) for i, text in enumerate(_LONG_B32)
]


@pytest.mark.parametrize(("hexdata", "text"), FIXTURES)
def test_spec_fixture(hexdata: str, text: str) -> None:
    assert b32encode(bytes.fromhex(hexdata)) == text
    assert b32decode(text) == bytes.fromhex(hexdata)


def test_fixture_count() -> None:
    assert len(FIXTURES) == 42


def test_upper_case_accepted() -> None:
    assert b32decode("MZXW6") == b"foo"


@pytest.mark.parametrize(
    "bad",
    ["mzxw6=", "mzxw 6", "mzxw1", "m", "mzx", "mzxw6yqa1", "mzxw7", "my======", "é", "mzxw6\n"],
)
def test_rejects_bad_text(bad: str) -> None:
    with pytest.raises(MalformedPacket):
        b32decode(bad)


def test_rejects_non_canonical_trailing_bits() -> None:
    # "mz" decodes to 0x66 with two non-zero trailing bits: a second spelling of "my".
    with pytest.raises(MalformedPacket):
        b32decode("mz")


def test_rejects_too_long() -> None:
    with pytest.raises(MalformedPacket):
        b32decode("a" * (MAX_B32_TEXT + 8))


@given(st.binary(max_size=300))
def test_round_trip(data: bytes) -> None:
    text = b32encode(data)
    assert text == text.lower() and "=" not in text
    assert b32decode(text) == data


@given(st.text(max_size=200))
def test_decoder_raises_only_malformed(text: str) -> None:
    try:
        data = b32decode(text)
    except MalformedPacket:
        return
    assert b32encode(data) == text.lower()
