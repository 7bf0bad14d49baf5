"""Per-packet cost of the secure wire vs raw NaCl secretbox.

Measures, for 1400-byte and 64 KiB inner packets:
  send    = Exchange.encrypt_channel + cloak (one round)
  receive = decloak + decode_packet + Exchange.decrypt_channel
  anchor  = nacl.bindings.crypto_secretbox_easy / _open_easy on the same bytes

Run:  .venv/bin/python bench/bench_crypto.py
Prints the table and writes the "crypto" section of bench/RESULTS.md.
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nacl.bindings as nb  # noqa: E402

from bench._results import write_section  # noqa: E402
from p2pcloud._crypto import LocalIdentity  # noqa: E402
from p2pcloud._wire import cloak, decloak, decode_packet  # noqa: E402
from p2pcloud.proto.exchange import Exchange, open_handshake  # noqa: E402

COMMAND = ".venv/bin/python bench/bench_crypto.py"


def linked() -> tuple[Exchange, Exchange]:
    a, b = LocalIdentity.generate(os.urandom), LocalIdentity.generate(os.urandom)
    xa = Exchange(a, b.cs3a_public, os.urandom)
    xb = Exchange(b, a.cs3a_public, os.urandom)
    v = xb.receive_handshake(open_handshake(b, decode_packet(xa.handshake(xa.new_at(1e9))).body))
    assert v.reply_at is not None
    xa.receive_handshake(open_handshake(a, decode_packet(xb.handshake(v.reply_at)).body))
    return xa, xb


def per_op(fn: object, size: int) -> float:
    """Best-of-5 microseconds per call."""
    number = 2000 if size <= 2048 else 100
    times = timeit.repeat(fn, number=number, repeat=5)  # type: ignore[arg-type]
    return min(times) / number * 1e6


def main() -> None:
    xa, xb = linked()
    key, nonce = os.urandom(32), os.urandom(24)
    rows = []
    for size in (1400, 65536):
        inner = os.urandom(size)
        wire = cloak(xa.encrypt_channel(inner), os.urandom)
        box = nb.crypto_secretbox_easy(inner, nonce, key)
        assert xb.decrypt_channel(decode_packet(decloak(wire)[0]).body) == inner

        def send(inner: bytes = inner) -> bytes:
            return cloak(xa.encrypt_channel(inner), os.urandom)

        def receive(wire: bytes = wire) -> bytes:
            return xb.decrypt_channel(decode_packet(decloak(wire)[0]).body)

        def raw_seal(inner: bytes = inner) -> bytes:
            return nb.crypto_secretbox_easy(inner, nonce, key)

        def raw_open(box: bytes = box) -> bytes:
            return nb.crypto_secretbox_open_easy(box, nonce, key)

        s, r = per_op(send, size), per_op(receive, size)
        rs, ro = per_op(raw_seal, size), per_op(raw_open, size)
        rows.append((size, s, rs, r, ro))

    lines = [
        "| inner packet | send: encrypt_channel+cloak | raw secretbox seal | ratio "
        "| receive: decloak+decode+decrypt_channel | raw secretbox open | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, s, rs, r, ro in rows:
        mbps = size / (s * 1e-6) / 2**20
        lines.append(
            f"| {size} B | {s:.1f} µs ({mbps:.0f} MiB/s) | {rs:.1f} µs | {s / rs:.1f}x "
            f"| {r:.1f} µs | {ro:.1f} µs | {r / ro:.1f}x |"
        )
    lines.append("")
    lines.append(
        "The wire adds one ChaCha20 pass (cloaking, cryptography/OpenSSL), the LOB framing "
        "and a 24-byte nonce draw (os.urandom) on top of the XSalsa20-Poly1305 secretbox; "
        "best of 5 runs."
    )
    table = "\n".join(lines)
    print(table)
    write_section("crypto", COMMAND, table)


if __name__ == "__main__":
    main()
