"""LAN discovery with zeroconf / mDNS (DESIGN.md section 4), bridged into Trio.

Theory of operation
-------------------
Finding the person's other devices on the same network needs no server: every node
registers the DNS-SD service ``_p2pcloud._udp.local.`` (RFC 6762 multicast DNS, RFC 6763
service discovery) and browses for it. This is our extension; Telehash v3's own LAN
``discover`` broadcast (v3 mesh.md) is not used.

* Instance name: ``<hashname>._p2pcloud._udp.local.``; SRV: our UDP port; A records: our
  IPv4 addresses.
* TXT record: ``v=1`` (format version), ``hn=<hashname>``, ``3a=<base32 CS3a key>``,
  ``s=<serial>`` (changes with every update) and, only while a short-code pairing is open
  (``p2pcloud.cloud.pairing``), ``pair=<nameplate>``.
  A browser computes the hashname from the key and drops records where they disagree, so a
  record cannot point a hashname at someone else's key; what it can still lie about is an
  address, and the E3X handshake to that address then simply fails (the link authenticates
  the key, never the address).

python-zeroconf runs its own thread and asyncio loop; its browser calls our handler in its
own thread too. The handler does the blocking record lookup there, then hands a finished
event to Trio with ``TrioToken.run_sync_soon`` (thread-safe, never blocks the zeroconf
thread); in the Trio thread the event updates :attr:`Discovery.peers` and goes into a
bounded ``trio`` memory channel (dropped and counted when the application does not keep
up). Every blocking zeroconf call (start, register, update, close) runs in
``trio.to_thread.run_sync``; shutdown is shielded from cancellation so the sockets and
threads are always released and a goodbye packet tells the other nodes we left.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import trio
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf._utils.net import get_all_addresses  # not re-exported by name; stable since 0.32

from p2pcloud._crypto import LocalIdentity, hashname_from_keys, is_hashname
from p2pcloud._ids import Hashname
from p2pcloud._wire import b32decode, b32encode
from p2pcloud.errors import LocalProtocolError, MalformedPacket

__all__ = [
    "SERVICE_TYPE",
    "DiscoveredPeer",
    "Discovery",
    "DiscoveryEvent",
    "PeerDiscovered",
    "PeerLost",
    "open_discovery",
]

log = logging.getLogger("p2pcloud.discovery")

SERVICE_TYPE: Final = "_p2pcloud._udp.local."
TXT_VERSION: Final = b"1"
LOOKUP_TIMEOUT_MS: Final = 3000  # one SRV/TXT/A lookup; mDNS answers within ~1 s on a LAN
MAX_ADDRESSES: Final = 16  # addresses we keep per peer: a device has a few interfaces
MAX_NAMEPLATE: Final = 99  # the pairing nameplate range (p2pcloud.cloud.pairing)
DEFAULT_BUFFER: Final = 64  # discovery events queued for the application before dropping


@dataclass(frozen=True, slots=True)
class DiscoveredPeer:
    """An endpoint seen on the LAN.

    Attributes:
        hashname: its hashname (checked against ``keys``).
        keys: its cipher-set keys (``{"3a": key}``), to link with.
        addresses: its IPv4 addresses, as text.
        port: its UDP port.
        pairing: the nameplate of its open short-code pairing, or None.
    """

    hashname: Hashname
    keys: dict[str, bytes]
    addresses: tuple[str, ...]
    port: int
    pairing: int | None = None

    def paths(self) -> list[dict[str, Any]]:
        """Telehash v3 path objects to link with (``udp4`` per address)."""
        return [{"type": "udp4", "ip": ip, "port": self.port} for ip in self.addresses]


@dataclass(frozen=True, slots=True)
class PeerDiscovered:
    """An endpoint appeared on the LAN, or its record changed (``updated``)."""

    peer: DiscoveredPeer
    updated: bool = False


@dataclass(frozen=True, slots=True)
class PeerLost:
    """An endpoint said goodbye (or its record expired)."""

    hashname: Hashname


DiscoveryEvent = PeerDiscovered | PeerLost


class Discovery:
    """A running LAN discovery (made by :func:`open_discovery`).

    Iterate it (``async for event in discovery``) for :class:`PeerDiscovered` and
    :class:`PeerLost` events; :attr:`peers` holds the endpoints seen now.
    """

    def __init__(
        self,
        identity: LocalIdentity,
        port: int,
        addresses: Sequence[str],
        zc: Zeroconf,
        token: trio.lowlevel.TrioToken,
        buffer: int,
    ) -> None:
        """Internal: use :func:`open_discovery`."""
        self._identity = identity
        self._port = port
        self._addresses = list(addresses)
        self._zc = zc
        self._token = token
        self._send, self._receive = trio.open_memory_channel[DiscoveryEvent](buffer)
        self._stats: Counter[str] = Counter()
        self._pairing: int | None = None
        self._serial = 0
        self._closed = False
        self._browser: ServiceBrowser | None = None
        self.peers: dict[Hashname, DiscoveredPeer] = {}
        self._info = self._service_info()

    # -- our own record ------------------------------------------------------------------

    def _service_info(self) -> ServiceInfo:
        props: dict[bytes, bytes] = {
            b"v": TXT_VERSION,
            b"hn": self._identity.hashname.encode("ascii"),
            b"3a": b32encode(self._identity.cs3a_public).encode("ascii"),
            # a serial that changes with every update: zeroconf browsers report a TXT change
            # only when the new record is not one they already cached (flag off -> on -> off
            # would otherwise go unnoticed the second time)
            b"s": str(self._serial).encode("ascii"),
        }
        if self._pairing is not None:
            props[b"pair"] = str(self._pairing).encode("ascii")
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self._identity.hashname}.{SERVICE_TYPE}",
            addresses=[ipaddress.IPv4Address(a).packed for a in self._addresses],
            port=self._port,
            properties=props,
            server=f"{self._identity.hashname}.local.",
        )

    @property
    def pairing(self) -> int | None:
        """The nameplate we advertise while a short-code pairing is open, or None."""
        return self._pairing

    async def set_pairing(self, nameplate: int | None) -> None:
        """Advertise (or stop advertising) an open short-code pairing.

        Args:
            nameplate: the open code's nameplate (1..99), or None when no code is open.

        Raises:
            LocalProtocolError: a nameplate out of range, or discovery is closed.
        """
        if nameplate is not None and not 1 <= nameplate <= MAX_NAMEPLATE:
            raise LocalProtocolError(f"a nameplate is 1..{MAX_NAMEPLATE}")
        if self._closed:
            raise LocalProtocolError("discovery is closed")
        if nameplate == self._pairing:
            return
        self._pairing = nameplate
        self._serial += 1
        self._info = self._service_info()
        info = self._info
        await trio.to_thread.run_sync(self._zc.update_service, info)

    # -- browsing (handler runs in zeroconf's browser thread) ---------------------------

    def _handler(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if self._closed or service_type != SERVICE_TYPE:
            return
        if state_change is ServiceStateChange.Removed:
            hashname = name[: -len(SERVICE_TYPE) - 1] if name.endswith("." + SERVICE_TYPE) else ""
            if is_hashname(hashname) and hashname != self._identity.hashname:
                self._to_trio(self._on_lost, Hashname(hashname))
            return
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=LOOKUP_TIMEOUT_MS)
        except Exception as exc:  # zeroconf raises several types when it is closing
            log.debug("zeroconf lookup of %s failed: %r", name, exc)
            info = None
        if info is None:
            self._to_trio(self._count, "lookup failed")
            return
        peer, reason = _parse_info(info)
        if peer is None:
            self._to_trio(self._count, reason)
            return
        if peer.hashname == self._identity.hashname:
            return
        self._to_trio(self._on_found, peer)

    def _to_trio(self, fn: Any, arg: Any) -> None:
        try:
            self._token.run_sync_soon(fn, arg)
        except trio.RunFinishedError:
            return

    # -- in the Trio thread ---------------------------------------------------------------

    def _count(self, reason: str) -> None:
        self._stats[reason] += 1

    def _emit(self, event: DiscoveryEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._stats["dropped: application too slow"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return

    def _on_found(self, peer: DiscoveredPeer) -> None:
        if self._closed:
            return
        old = self.peers.get(peer.hashname)
        if old == peer:
            return
        self.peers[peer.hashname] = peer
        self._stats["found" if old is None else "updated"] += 1
        self._emit(PeerDiscovered(peer, updated=old is not None))

    def _on_lost(self, hashname: Hashname) -> None:
        if self._closed or self.peers.pop(hashname, None) is None:
            return
        self._stats["lost"] += 1
        self._emit(PeerLost(hashname))

    def statistics(self) -> dict[str, int]:
        """Counts of what discovery saw and dropped, by reason."""
        return dict(self._stats)

    def __aiter__(self) -> AsyncIterator[DiscoveryEvent]:
        """Iterate discovery events until discovery closes."""
        return self._receive.__aiter__()

    async def receive(self) -> DiscoveryEvent:
        """The next discovery event.

        Raises:
            trio.EndOfChannel: discovery closed.
        """
        return await self._receive.receive()

    async def wait_peer(self, hashname: Hashname) -> DiscoveredPeer:
        """Wait until ``hashname`` is seen (returns at once if it already is).

        Consumes events from the iterator while it waits; use it or iterate, not both.

        Args:
            hashname: the endpoint to wait for.

        Returns:
            Its record.
        """
        while hashname not in self.peers:
            await self._receive.receive()
        return self.peers[hashname]

    # -- lifecycle ------------------------------------------------------------------------

    def _start_blocking(self) -> None:
        self._zc.register_service(self._info, allow_name_change=False)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._handler])

    def _stop_blocking(self) -> None:
        try:
            if self._browser is not None:
                self._browser.cancel()
            self._zc.unregister_service(self._info)  # the goodbye: others drop us at once
        except Exception as exc:  # never let cleanup mask the error that ended the block
            log.debug("zeroconf shutdown: %r", exc)
        finally:
            self._zc.close()


def _parse_info(info: ServiceInfo) -> tuple[DiscoveredPeer | None, str]:
    # Everything here came from the network: check every field, never raise.
    props = info.properties or {}
    hn, key_text, pair = props.get(b"hn"), props.get(b"3a"), props.get(b"pair")
    if props.get(b"v") != TXT_VERSION:
        return None, "unknown record version"
    if not isinstance(hn, bytes) or not isinstance(key_text, bytes):
        return None, "record without hashname or key"
    try:
        hashname = hn.decode("ascii")
        key = b32decode(key_text.decode("ascii"))
    except (UnicodeDecodeError, MalformedPacket):
        return None, "malformed key"
    if len(key) != 32:
        return None, "malformed key"
    try:
        computed = hashname_from_keys({"3a": key})
    except MalformedPacket:
        return None, "malformed key"
    if computed != hashname:
        return None, "hashname does not match key"
    nameplate: int | None = None
    if pair is not None:
        if not (isinstance(pair, bytes) and pair.isdigit() and len(pair) <= 2):
            return None, "malformed pairing flag"
        nameplate = int(pair)
        if not 1 <= nameplate <= MAX_NAMEPLATE:
            return None, "malformed pairing flag"
    addresses = tuple(info.parsed_addresses(IPVersion.V4Only)[:MAX_ADDRESSES])
    port = info.port
    if not addresses or port is None or not 0 < port < 65536:
        return None, "record without address or port"
    return DiscoveredPeer(Hashname(hashname), {"3a": key}, addresses, port, nameplate), ""


@asynccontextmanager
async def open_discovery(
    identity: LocalIdentity,
    port: int,
    *,
    interfaces: Sequence[str] | None = None,
    addresses: Sequence[str] | None = None,
    pairing: int | None = None,
    buffer: int = DEFAULT_BUFFER,
) -> AsyncIterator[Discovery]:
    """Advertise this endpoint on the LAN and browse for others, while the block runs.

    Args:
        identity: our identity (hashname and CS3a key go into the TXT record).
        port: our UDP port.
        interfaces: IPv4 addresses of the interfaces to use (``["127.0.0.1"]`` in tests);
            None uses every interface.
        addresses: the addresses to advertise; by default the ``interfaces`` given, or every
            IPv4 address of the machine except loopback.
        pairing: a nameplate to advertise from the start, or None.
        buffer: discovery events queued before new ones are dropped (and counted).

    Yields:
        The running :class:`Discovery`.

    Raises:
        LocalProtocolError: bad arguments, or no address to advertise.
    """
    if not 0 < port < 65536:
        raise LocalProtocolError(f"port {port} out of range")
    if pairing is not None and not 1 <= pairing <= MAX_NAMEPLATE:
        raise LocalProtocolError(f"a nameplate is 1..{MAX_NAMEPLATE}")
    if addresses is None:
        if interfaces is not None:
            addresses = list(interfaces)
        else:
            addresses = [a for a in await trio.to_thread.run_sync(get_all_addresses)
                         if not a.startswith("127.")]
    try:
        for address in addresses:
            ipaddress.IPv4Address(address)
    except ValueError as exc:
        raise LocalProtocolError(f"not an IPv4 address: {exc}") from exc
    if not addresses:
        raise LocalProtocolError("no IPv4 address to advertise")
    choice: Any = list(interfaces) if interfaces is not None else InterfaceChoice.All
    zc = await trio.to_thread.run_sync(
        lambda: Zeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
    )
    discovery = Discovery(
        identity, port, addresses[:MAX_ADDRESSES], zc, trio.lowlevel.current_trio_token(),
        buffer,
    )
    if pairing is not None:
        discovery._pairing = pairing
        discovery._info = discovery._service_info()
    try:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(discovery._start_blocking)
        yield discovery
    finally:
        discovery._closed = True
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(discovery._stop_blocking)
        await discovery._send.aclose()
