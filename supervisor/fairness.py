"""Which client a request belongs to, for fairness inside a priority level: the key, hashed, and its weight.

A key value (a client id, an Authorization header, an address) is hashed here and only the hash goes
further: into the queue, onto a job, never into a log or a metric label in clear. The hash is
blake2b with a fixed personalisation and no secret, so it is the same after a restart (a job keeps
its key) and a configured weight, named by clear value, is found by hashing its name the same way.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from functools import lru_cache

from .config import Fairness

ANONYMOUS = "anonymous"  # requests without the header (or without a peer address) share this key
_PERSON = b"gpu-supervisor"


@lru_cache(maxsize=4096)
def hash_key(value: str) -> str:
    """The stable, non-reversible-at-a-glance form of a key value (32 hex digits)."""
    raw = value.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(raw, digest_size=16, person=_PERSON).hexdigest()


def _peer_value(peer: str) -> str:
    """One spelling per address: IPv6 compressed, an IPv4-mapped IPv6 address as IPv4."""
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def client_key(fairness: Fairness, headers: Mapping[str, str], peer: str | None) -> str | None:
    """The hashed key of a request, or None when fairness is off.

    `headers` should be case-insensitive (aiohttp's are); a plain dict is also looked up by the
    configured spelling and in lower case. A request without the header, or without a peer address
    for `ip`, gets ANONYMOUS: all such requests share one key.
    """
    kind = fairness.key
    if kind is None:
        return None
    if kind == "ip":
        return hash_key(_peer_value(peer)) if peer else ANONYMOUS
    name = kind[7:]  # "header:<Name>", validated by config
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return hash_key(value) if value else ANONYMOUS


def configured_key(fairness: Fairness, name: str) -> str:
    """The hashed key of a clear value named in the config (a weight, a client budget)."""
    return hash_key(_peer_value(name) if fairness.key == "ip" else name)


def weight_table(fairness: Fairness) -> dict[str, float]:
    """Configured weights by hashed key, the form the queue sees; keys not named weigh 1."""
    return {configured_key(fairness, name): w for name, w in fairness.weights.items()}
