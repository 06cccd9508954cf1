"""Token authentication and client identity, sans-IO.

Tokens are random (256 bits, URL-safe); the server stores only their SHA-256, one per line of the
tokens file with a label: ``sha256:<hex> <label>``. A fast hash is right here: the tokens are
long random secrets, not passwords, so nothing is gained by a slow one. Comparison is
constant-time over every stored hash. A client presents its token in one of three places:
``Authorization: Bearer <token>``, the ``token`` query parameter (browsers cannot set headers on
a WebSocket), or a ``Sec-WebSocket-Protocol`` value ``bearer.<token>`` (echoed back).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path
from urllib.parse import parse_qs

import attrs

from .http import RequestHead

_PREFIX = "sha256:"
SUBPROTOCOL_PREFIX = "bearer."


class TokensFileError(ValueError):
    pass


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return _PREFIX + hashlib.sha256(token.encode()).hexdigest()


def tokens_file_line(token: str, label: str) -> str:
    if not label or any(c.isspace() for c in label):
        raise ValueError("a label is one word without spaces, e.g. team-frontend")
    return f"{hash_token(token)} {label}"


@attrs.frozen
class TokenStore:
    #: hash -> label
    entries: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        entries = {}
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror}") from None
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            digest, _, label = line.partition(" ")
            if not digest.startswith(_PREFIX) or len(digest) != len(_PREFIX) + 64 or not label:
                raise TokensFileError(
                    f"{path}:{number}: expected 'sha256:<64 hex digits> <label>' "
                    "(see `stt-server token new LABEL`)"
                )
            entries[digest] = label.strip()
        return cls(entries)

    def label_for(self, token: str | None) -> str | None:
        """The token's label, or None. Every stored hash is compared, in constant time."""
        if not token:
            return None
        digest = hash_token(token)
        found = None
        for stored, label in self.entries.items():
            if hmac.compare_digest(stored, digest):
                found = label
        return found


@attrs.frozen
class Credentials:
    token: str | None
    #: The subprotocol to echo when the token came in Sec-WebSocket-Protocol.
    subprotocol: str | None = None


def credentials(head: RequestHead) -> Credentials:
    authorization = head.headers.get("authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return Credentials(value.strip())
    query = parse_qs(head.query)
    if query.get("token"):
        return Credentials(query["token"][0])
    for proto in head.headers.get("sec-websocket-protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(SUBPROTOCOL_PREFIX) and len(proto) > len(SUBPROTOCOL_PREFIX):
            return Credentials(proto[len(SUBPROTOCOL_PREFIX) :], subprotocol=proto)
    return Credentials(None)


def parse_networks(spec: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``10.0.0.0/8, 127.0.0.1`` -> networks (a bare address is a /32 or /128)."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part:
            out.append(ipaddress.ip_network(part, strict=False))
    return tuple(out)


def client_ip(
    peer_ip: str,
    head: RequestHead,
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    real_ip_header: str = "",
) -> str:
    """The address a limit should count: the socket peer, unless the peer is a trusted proxy.
    Then ``real_ip_header`` (only when configured: a proxy that does not set it would let the
    client set it) or else the right-most ``X-Forwarded-For`` hop that is not a trusted proxy,
    since every proxy appends the address it saw and only our own proxies' entries can be
    believed. Headers from anyone else are ignored, since anyone can forge them."""

    if not is_trusted(peer_ip, trusted):
        return peer_ip
    if real_ip_header:
        real = head.headers.get(real_ip_header.lower(), "").strip()
        if real and _valid_ip(real):
            return real
    hops = [h.strip() for h in head.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):  # the right end was appended by our own proxies
        if not _valid_ip(hop):
            break
        if not is_trusted(hop, trusted):
            return hop
    return peer_ip


def is_trusted(
    address: str, trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    """Whether ``address`` lies in one of the ``trusted`` networks (False if it is no address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def is_loopback(host: str) -> bool:
    """Whether a listening address (or ``localhost``) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


#: IPv6 hosts get a /64 each (RFC 6177), and one host can use all of it: limits count per /64.
IPV6_PREFIX = 64


def address_key(ip: str) -> str:
    """What per-address limits count: an IPv4 address, or the /64 network of an IPv6 one
    (an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
