"""Bad input at node level, over real channels on 127.0.0.1: rejected, logged, nothing stored.

The hostile peer is a real node without a data dir (no replication engine of its own) that
opens ``sync`` and ``blob`` channels to the victim and writes crafted messages on them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import trio

import p2pcloud
from p2pcloud._core import Replica
from p2pcloud._crypto import LocalIdentity
from p2pcloud._ids import SubCloudId
from p2pcloud.blobs import (
    ChunkData,
    ManifestWant,
    Want,
    decode_blob_message,
    encode_blob_message,
    manifest_of,
    manifest_pieces,
)
from p2pcloud.sync import replica_id_for, seal
from p2pcloud.sync.envelope import (
    REJECT_BAD_SIGNATURE,
    REJECT_MALFORMED,
    REJECT_NO_WRITE_RIGHTS,
    REJECT_REPLICA_MISMATCH,
    REJECT_UNKNOWN_SUBCLOUD,
)
from p2pcloud.sync.messages import Envelopes, encode_message
from tests.integration.test_subclouds import wait_for

NOW_MS = 1_780_000_000_000


def delta_by(identity: LocalIdentity, sc: SubCloudId, doc: str) -> bytes:
    r = Replica(replica_id_for(sc, identity.hashname))
    r.begin(NOW_MS)
    r.set("c", doc, "f", doc)
    return r.commit()


async def test_forged_forbidden_and_unknown_deltas_are_rejected(tmp_path: Path) -> None:
    writer = LocalIdentity.generate(os.urandom)  # has write rights, never online
    mallory = LocalIdentity.generate(os.urandom)
    async with p2pcloud.open_node(tmp_path / "b") as b, \
            p2pcloud.open_node(identity=mallory) as m:
        assert m.replication is None
        sc = await b.create_subcloud("victim")
        await sc.share(writer.hashname, "write")
        await sc.share(m.hashname, "read")
        await m.link(b.link_uri)
        good = seal(writer, sc.id, delta_by(writer, sc.id, "good"))
        forged_raw = bytearray(seal(writer, sc.id, delta_by(writer, sc.id, "evil")).raw)
        forged_raw[-70] ^= 1  # a byte of the delta: the signature no longer matches
        own = seal(mallory, sc.id, delta_by(mallory, sc.id, "mine")).raw  # read rights only
        other = SubCloudId(os.urandom(16))
        unknown = seal(mallory, other, delta_by(mallory, other, "x")).raw
        # mallory's key with the writer's replica id: a delta in another member's name
        stolen_name = bytearray(own)
        rid_m = replica_id_for(sc.id, mallory.hashname)
        rid_w = replica_id_for(sc.id, writer.hashname)
        at = bytes(stolen_name).find(rid_m)
        stolen_name[at:at + 16] = rid_w
        stream = await m.open_channel(b.hashname, "sync")
        batches = [
            Envelopes(sc.id, 1, (bytes(forged_raw),)),
            Envelopes(sc.id, 2, (own,)),
            Envelopes(sc.id, 3, (b"\xa1\x00garbage",)),
            Envelopes(sc.id, 4, (unknown,)),  # a delta of another sub-cloud in this batch
            Envelopes(other, 5, (unknown,)),  # a sub-cloud the victim does not replicate
            Envelopes(sc.id, 6, (bytes(stolen_name),)),
            Envelopes(sc.id, 7, (good.raw,)),  # the control: a valid delta goes through
        ]
        await stream.send_all(b"".join(encode_message(x) for x in batches))
        await wait_for(lambda: sc.get("c", "good") is not None, "the valid delta")
        # the replica shows a merge before the store holds it (ingest applies, then appends,
        # then records it in the catalog): wait for the record before reading the store
        catalog = b.replication.catalog  # type: ignore[union-attr]
        await wait_for(lambda: catalog.counter(sc.id, rid_w) == 1, "the valid delta stored")
        reasons = {r for _peer, r, _d in b.replication.rejections}  # type: ignore[union-attr]
        assert {REJECT_BAD_SIGNATURE, REJECT_NO_WRITE_RIGHTS, REJECT_MALFORMED,
                REJECT_UNKNOWN_SUBCLOUD, REJECT_REPLICA_MISMATCH,
                "sync message dropped"} <= reasons, reasons
        store = b.replication.store  # type: ignore[union-attr]
        version = await trio.to_thread.run_sync(store.version, sc.id)
        assert version == {rid_w: 1}  # only the valid delta is stored
        assert sc.documents("c") == ["good"]
        assert await trio.to_thread.run_sync(store.version, other) == {}
        assert other not in b.replication.subclouds  # type: ignore[union-attr]
        await stream.aclose()


async def test_wrong_and_truncated_chunks_are_refused(tmp_path: Path) -> None:
    data = os.urandom(300 * 1024)
    manifest = manifest_of(data)
    mallory = LocalIdentity.generate(os.urandom)
    async with p2pcloud.open_node(tmp_path / "b") as b, \
            p2pcloud.open_node(identity=mallory) as m:
        await m.link(b.link_uri)
        sc = await b.create_subcloud("victim")
        ref_hash = manifest.blob_hash
        from p2pcloud._core import BlobRef

        stream = await m.open_channel(b.hashname, "blob")
        frame = struct.Struct(">I")
        sent = {"chunks": 0}

        async def serve_lies() -> None:
            buf = bytearray()
            while data_in := await stream.receive_some():
                buf += data_in
                while len(buf) >= 4 and len(buf) >= 4 + frame.unpack_from(buf)[0]:
                    n = frame.unpack_from(buf)[0]
                    msg = decode_blob_message(bytes(buf[4:4 + n]))
                    del buf[:4 + n]
                    replies = []
                    if isinstance(msg, ManifestWant):
                        replies = list(manifest_pieces(manifest, msg.offset))
                    elif isinstance(msg, Want):
                        for i, h in enumerate(msg.hashes):
                            size = next(c.size for c in manifest.chunks if c.hash == h)
                            bad = os.urandom(size) if i % 2 else os.urandom(size)[: size // 2]
                            replies.append(ChunkData(h, bad))  # wrong bytes, or truncated
                            sent["chunks"] += 1
                    out = b"".join(frame.pack(len(e)) + e
                                   for e in map(encode_blob_message, replies))
                    if out:
                        await stream.send_all(out)

        engine = b.replication.blobs  # type: ignore[union-attr]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_lies)
            reader = sc.open_blob(BlobRef(ref_hash, len(data)))
            nursery.start_soon(reader.read_all)
            await wait_for(lambda: engine.statistics().get("stalled", 0) >= 1 and sent["chunks"],
                           "the fetch to give up on the lying peer")
            nursery.cancel_scope.cancel()
        store = b.replication.store  # type: ignore[union-attr]
        held = await trio.to_thread.run_sync(store.has_chunks, [c.hash for c in manifest.chunks])
        assert held == set()
        assert engine.statistics().get("chunks received", 0) == 0
        # the manifest itself was genuine (it hashes to the blob): it is kept, verified
        assert await trio.to_thread.run_sync(store.get_chunk, ref_hash) == manifest.encoded
