"""The DNS front: an authoritative server for the app's zone, on UDP and TCP, built on dnslib.

Names it answers (everything below is case-insensitive):

* the zone apex: `SOA` and `NS` (one nameserver, `ns1.<zone>`);
* `ns1.<zone>`: the server's own addresses, when it listens on a specific one;
* the app's name: `A` / `AAAA` of the region chosen for the client (TTL `ttl_s`, default 30 s;
  `suspect_ttl_s`, default 1 s, while a vantage point has lately seen that region fail, so a
  resolver does not keep a dying region's address for the full TTL);
* `<region>.<app name>`: that region's addresses, whatever its health (for pinning and tests);
* the primary-only names (`[routing] primary_names`, default `primary.<app name>`): the addresses
  of the current epoch's primary, whatever its health (they follow a promotion at once);
* any other name in the zone: `NXDOMAIN` with the `SOA` (negative TTL = `ttl_s`);
* a name outside the zone: `REFUSED` (this server is authoritative only).

EDNS Client Subnet (RFC 7871): the client's subnet, when sent, chooses the region instead of the
resolver's address, and is echoed with a SCOPE PREFIX-LENGTH saying how many leading bits decided
the answer (0 for answers that do not depend on the client). A malformed option is `FORMERR`.

`DnsFront.handle()` never raises: any packet gets a well-formed answer (`FORMERR` when the query
cannot be parsed), or nothing when it is not a query at all (too short, or a response).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass

from dnslib import (
    AAAA,
    EDNS0,
    NS,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
    EDNSOption,
)

from latitude.routing.choice import RegionRouter
from latitude.routing.config import RoutingConfig

log = logging.getLogger(__name__)

ECS_OPTION = 8
EDNS_UDP_SIZE = 1232  # the DNS flag day 2020 default: no IP fragmentation
CLASS_IN, CLASS_ANY = 1, 255
BADVERS = 16
TCP_IDLE_S = 10.0
TCP_MAX_CONNECTIONS = 512
# The answer cache: RTT rankings may lag this much; health changes take effect at once.
CACHE_S = 1.0
CACHE_ENTRIES = 65536

_HEADER = struct.Struct("!HH")


class FormatError(Exception):
    pass


@dataclass(frozen=True)
class ClientSubnet:
    family: int
    source: int
    address: bytes  # as sent: ceil(source / 8) bytes
    ip: str  # the address padded to full length

    def echo(self, scope: int) -> EDNSOption:
        payload = struct.pack("!HBB", self.family, self.source, scope) + self.address
        return EDNSOption(ECS_OPTION, payload)


def parse_client_subnet(data: bytes) -> ClientSubnet:
    """RFC 7871 section 6, with the checks section 7 asks of a server (FormatError otherwise)."""
    if len(data) < 4:
        raise FormatError("ECS option shorter than 4 bytes")
    family, source, _scope = struct.unpack("!HBB", data[:4])
    address = data[4:]
    if family == 1:
        bits = 32
    elif family == 2:
        bits = 128
    else:
        raise FormatError(f"ECS family {family} is neither IPv4 (1) nor IPv6 (2)")
    if source > bits:
        raise FormatError(f"ECS source prefix {source} longer than {bits} bits")
    if len(address) != (source + 7) // 8:
        raise FormatError("ECS address length does not match its source prefix")
    full = address + bytes(bits // 8 - len(address))
    value = int.from_bytes(full, "big")
    if value & ((1 << (bits - source)) - 1):
        raise FormatError("ECS address has bits set past its source prefix")
    ip = str(ipaddress.IPv4Address(full) if family == 1 else ipaddress.IPv6Address(full))
    return ClientSubnet(family, source, address, ip)


def _labels(name: str) -> tuple[bytes, ...]:
    return tuple(x.encode() for x in name.lower().rstrip(".").split(".") if x)


class DnsFront:
    """The protocol logic; `DnsServer` puts it on sockets."""

    def __init__(
        self,
        config: RoutingConfig,
        router: RegionRouter,
        nameserver_addresses: tuple[str, ...] = (),
        serial: int | None = None,
    ):
        self.config = config
        self.router = router
        self.ttl = config.ttl_s
        self.suspect_ttl = min(config.suspect_ttl_s, config.ttl_s)
        self.zone = _labels(config.zone)
        self.app = _labels(config.name)
        self.nameserver = _labels(config.nameserver)
        self.ns_addresses = tuple(nameserver_addresses)
        self.regions = {_labels(f"{r.name}.{config.name}"): r.name for r in router.topology.regions}
        self.primary_only = {_labels(n) for n in config.primary_only} - set(self.regions)
        self.soa = SOA(
            config.nameserver,
            "hostmaster." + config.zone,
            (serial or int(time.time()), 3600, 600, 86400, config.ttl_s),
        )
        self._rdatas: dict[str, tuple[int, A | AAAA]] = {}
        self.stats = {
            "queries": 0,
            "answered": 0,
            "formerr": 0,
            "dropped": 0,
            "errors": 0,
            "cached": 0,
        }
        # Answers by (query bytes after the ID, client address): valid for CACHE_S at most and
        # only while the sets of healthy and suspect regions are the ones they were computed for.
        self._cache: dict[tuple[bytes, str, bool], tuple[float, tuple, bytes]] = {}

    # ---- entry point ----------------------------------------------------------------------

    def handle(self, data: bytes, client_ip: str, tcp: bool = False) -> bytes | None:
        """One query in, one answer out (None: send nothing). Never raises."""
        self.stats["queries"] += 1
        try:
            key = (bytes(data[2:]), client_ip, tcp)
            hit = self._cache.get(key)
            now = time.monotonic()
            view = self.router.view()
            # A promotion changes answers as a health change does: at once.
            healthy = (view.healthy, view.suspect, self.router.primary())
            if hit is not None and hit[0] > now and hit[1] == healthy:
                self.stats["cached"] += 1
                self.stats["answered"] += 1
                return bytes(data[:2]) + hit[2]
            answer = self._handle(data, client_ip, tcp)
            if answer is not None:
                if len(self._cache) >= CACHE_ENTRIES:
                    self._cache.clear()
                self._cache[key] = (now + CACHE_S, healthy, answer[2:])
            return answer
        except Exception:  # a bug must cost one answer, never the server
            self.stats["errors"] += 1
            log.exception("unexpected error answering a query from %s", client_ip)
            try:
                return self._bare(data, RCODE.SERVFAIL)
            except Exception:
                return None

    # ---- the logic ------------------------------------------------------------------------

    def _bare(self, data: bytes, rcode: int) -> bytes | None:
        """An answer with only a header: for queries that cannot be parsed."""
        if len(data) < 12:
            return None
        qid, flags = _HEADER.unpack_from(data)
        opcode = (flags >> 11) & 0xF
        rd = (flags >> 8) & 1
        header = DNSHeader(id=qid, bitmap=0, qr=1, opcode=opcode, rd=rd, rcode=rcode)
        return bytes(DNSRecord(header).pack())

    def _handle(self, data: bytes, client_ip: str, tcp: bool) -> bytes | None:
        if len(data) < 12:
            self.stats["dropped"] += 1
            return None
        _qid, flags = _HEADER.unpack_from(data)
        if flags & 0x8000:  # a response: never answer one (no loops between servers)
            self.stats["dropped"] += 1
            return None
        try:
            query = DNSRecord.parse(data)
        except Exception:
            self.stats["formerr"] += 1
            return self._bare(data, RCODE.FORMERR)
        h = query.header
        reply = DNSRecord(DNSHeader(id=h.id, bitmap=0, qr=1, opcode=h.opcode, rd=h.rd))
        if query.questions and len(query.questions) == 1:
            reply.add_question(query.questions[0])
        # EDNS: at most one OPT record, version 0.
        opts = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
        if len(opts) > 1 or (opts and opts[0].rname.label):
            return self._finish(reply, RCODE.FORMERR, None, None, tcp)
        opt = opts[0] if opts else None
        udp_limit = max(512, min(opt.edns_len, EDNS_UDP_SIZE)) if opt else 512
        if opt is not None and opt.edns_ver != 0:
            return self._finish(reply, BADVERS, opt, None, tcp, udp_limit)
        if h.opcode != 0:  # only QUERY; other opcodes' sections mean other things
            reply.questions = []
            return self._finish(reply, RCODE.NOTIMP, opt, None, tcp, udp_limit)
        if len(query.questions) != 1:
            self.stats["formerr"] += 1
            return self._finish(reply, RCODE.FORMERR, opt, None, tcp, udp_limit)
        ecs: ClientSubnet | None = None
        if opt is not None:
            for o in opt.rdata:
                if o.code == ECS_OPTION:
                    if ecs is not None:
                        return self._finish(reply, RCODE.FORMERR, opt, None, tcp, udp_limit)
                    try:
                        ecs = parse_client_subnet(o.data)
                    except FormatError:
                        self.stats["formerr"] += 1
                        return self._finish(reply, RCODE.FORMERR, opt, None, tcp, udp_limit)
        q = query.questions[0]
        if q.qclass not in (CLASS_IN, CLASS_ANY):
            return self._finish(reply, RCODE.REFUSED, opt, ecs, tcp, udp_limit, scope=0)
        labels = tuple(x.lower() for x in q.qname.label)
        if labels[-len(self.zone) :] != self.zone or len(labels) < len(self.zone):
            return self._finish(reply, RCODE.REFUSED, opt, ecs, tcp, udp_limit, scope=0)
        reply.header.aa = 1
        qtype = q.qtype
        scope = 0
        if labels == self.app:
            if ecs is not None and ecs.source > 0:
                choice = self.router.choose_for_address(ecs.ip, ecs.source)
                scope = choice.scope
            else:
                choice = self.router.choose_for_address(client_ip)
            suspect = choice.region in self.router.view().suspect
            ttl = self.suspect_ttl if suspect else self.ttl
            self._addresses(reply, q, choice.addresses, ttl)
        elif labels in self.primary_only:
            self._addresses(reply, q, self.router.primary_choice().addresses)
        elif labels in self.regions:
            self._addresses(reply, q, self.router.config.addresses.get(self.regions[labels], ()))
        elif labels == self.nameserver:
            self._addresses(reply, q, self.ns_addresses)
        elif labels == self.zone:
            if qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(RR(q.qname, QTYPE.SOA, rdata=self.soa, ttl=self.ttl))
            if qtype in (QTYPE.NS, QTYPE.ANY):
                reply.add_answer(
                    RR(q.qname, QTYPE.NS, rdata=NS(self.config.nameserver), ttl=self.ttl)
                )
                self._glue(reply)
        else:
            reply.add_auth(RR(self.config.zone, QTYPE.SOA, rdata=self.soa, ttl=self.ttl))
            return self._finish(reply, RCODE.NXDOMAIN, opt, ecs, tcp, udp_limit, scope=0)
        if not reply.rr:  # the name exists but not with this type: NODATA
            reply.add_auth(RR(self.config.zone, QTYPE.SOA, rdata=self.soa, ttl=self.ttl))
        return self._finish(reply, RCODE.NOERROR, opt, ecs, tcp, udp_limit, scope=scope)

    def _rdata(self, ip: str) -> tuple[int, A | AAAA]:
        found = self._rdatas.get(ip)
        if found is None:
            found = (QTYPE.AAAA, AAAA(ip)) if ":" in ip else (QTYPE.A, A(ip))
            self._rdatas[ip] = found
        return found

    def _addresses(
        self, reply: DNSRecord, q: DNSQuestion, addresses, ttl: int | None = None
    ) -> None:
        for ip in addresses:
            rtype, rdata = self._rdata(ip)
            if q.qtype in (rtype, QTYPE.ANY):
                reply.add_answer(
                    RR(q.qname, rtype, rdata=rdata, ttl=self.ttl if ttl is None else ttl)
                )

    def _glue(self, reply: DNSRecord) -> None:
        for ip in self.ns_addresses:
            rtype, rdata = (QTYPE.AAAA, AAAA(ip)) if ":" in ip else (QTYPE.A, A(ip))
            reply.add_ar(RR(self.config.nameserver, rtype, rdata=rdata, ttl=self.ttl))

    def _finish(
        self,
        reply: DNSRecord,
        rcode: int,
        opt: RR | None,
        ecs: ClientSubnet | None,
        tcp: bool,
        udp_limit: int = 512,
        scope: int = 0,
    ) -> bytes:
        reply.header.rcode = rcode & 0xF
        if opt is not None:
            options = [ecs.echo(scope)] if ecs is not None else []
            reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE, ext_rcode=rcode >> 4, opts=options))
        packed = reply.pack()
        if not tcp and len(packed) > udp_limit:
            reply.header.tc = 1
            reply.rr, reply.auth = [], []
            reply.ar = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
            packed = reply.pack()
        self.stats["answered"] += 1
        return bytes(packed)


# ---- sockets ------------------------------------------------------------------------------


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, front: DnsFront):
        self.front = front
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        answer = self.front.handle(data, addr[0])
        if answer is not None and self.transport is not None:
            with contextlib.suppress(OSError):
                self.transport.sendto(answer, addr)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable
        log.debug("udp: %s", exc)


class DnsServer:
    """`DnsFront` on a UDP socket and a TCP listener sharing one port."""

    def __init__(self, front: DnsFront, host: str = "127.0.0.1", port: int = 5353):
        self.front = front
        self.host = host
        self.port = port
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _attempt in range(50):
            udp_sock = self._socket(socket.SOCK_DGRAM, self.port)
            port = udp_sock.getsockname()[1]
            try:
                tcp_sock = self._socket(socket.SOCK_STREAM, port)
            except OSError:
                udp_sock.close()
                if self.port:
                    raise
                continue  # an ephemeral UDP port whose TCP twin is taken: try another
            break
        else:  # pragma: no cover
            raise OSError("no port free for both UDP and TCP")
        self.port = port
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self.front), sock=udp_sock
        )
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp_sock, backlog=256)

    def _socket(self, kind: int, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        s = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            else:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((self.host, port))
            if kind == socket.SOCK_STREAM:
                s.listen(256)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._connections) >= TCP_MAX_CONNECTIONS:
            writer.close()
            return
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info("peername")
        client_ip = peer[0] if peer else "0.0.0.0"
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_S):
                    size = struct.unpack("!H", await reader.readexactly(2))[0]
                    data = await reader.readexactly(size)
                answer = self.front.handle(data, client_ip, tcp=True)
                if answer is None:
                    break  # not a query: the stream cannot be trusted further
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
