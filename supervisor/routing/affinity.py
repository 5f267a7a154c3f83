"""The pure choice of a replica: a prompt's prefix blocks, each replica's prefix index, rendezvous hashing and
SGLang's cache-aware rule, over plain values (no I/O, no clock, no event loop).

The prefix index is approximate, as in SGLang's router and llm-d's prefix scorer: it records what was sent to
a replica, not what its engine holds. Prompts are cut into blocks of bytes (no tokenizer) and each block's
hash covers every block before it, so one lookup per block tells how long a prefix a replica has seen.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_BYTES = 64  # prompt bytes per block of the prefix index

# routing decisions, the `decision` label of routing_decisions_total
LEAST_LOADED = "least_loaded"
SESSION = "session"
PREFIX_HIT = "prefix_hit"
PREFIX_MISS = "prefix_miss"
BALANCE = "balance"

_BLOCK_PERSON = b"gs-prefix"
_RENDEZVOUS_PERSON = b"gs-rendezvous"
_DIGEST = 8


def _text_of(content: object) -> str:
    """A message's content as text: a string, or the "text" fields of a list of parts (images and the like
    carry none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_text(body: object) -> str | None:
    """The prompt of a parsed JSON request body: `prompt` (a string, or a list of strings joined by "\\n"),
    else `messages` (each message's role and content in order: "role\\ncontent\\n"); None when it has neither.

    A `prompt` of another shape (token ids) counts as absent.
    """
    if not isinstance(body, dict):
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "\n".join(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        parts.append(f"{role if isinstance(role, str) else ''}\n{_text_of(message.get('content'))}\n")
    return "".join(parts)


def prompt_blocks(text: str, block_bytes: int = BLOCK_BYTES) -> list[bytes]:
    """Chain hashes of the UTF-8 prompt's full blocks (block i's hash covers blocks 0..i): equal lists mean
    equal prefixes. The partial last block is left out (a prompt under one block has no blocks)."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, not {block_bytes}")
    raw = text.encode("utf-8", "surrogatepass")  # a JSON body may hold a lone surrogate
    hashes: list[bytes] = []
    previous = b""
    for start in range(0, len(raw) - block_bytes + 1, block_bytes):
        digest = hashlib.blake2b(previous, digest_size=_DIGEST, person=_BLOCK_PERSON)
        digest.update(raw[start : start + block_bytes])
        previous = digest.digest()
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """An approximate record of the prompt prefixes sent to one replica (what its engine has likely cached):
    chain hashes with least-recently-used eviction, bounded by `max_bytes` of prompt covered (each block
    counts block_bytes).

    A prompt's blocks are touched from its last to its first, so among them the deepest is the least recently
    used: eviction drops the ends of old prompts before their beginnings, as a radix tree drops its leaves.
    """

    def __init__(self, max_bytes: int, block_bytes: int = BLOCK_BYTES) -> None:
        if max_bytes < 0 or block_bytes <= 0:
            raise ValueError(f"max_bytes must be >= 0 and block_bytes > 0, not {max_bytes} and {block_bytes}")
        self._block_bytes = block_bytes
        self._max_blocks = max_bytes // block_bytes
        self._blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first

    @property
    def size_bytes(self) -> int:
        """Prompt bytes the index covers now (never over max_bytes)."""
        return len(self._blocks) * self._block_bytes

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, blocks: list[bytes]) -> int:
        """How many leading blocks of a prompt are held; the recency of none changes."""
        held = 0
        for block in blocks:
            if block not in self._blocks:
                break
            held += 1
        return held

    def insert(self, blocks: list[bytes]) -> None:
        """Hold a prompt's blocks as the most recently used, then drop the least recently used past the bound."""
        for block in reversed(blocks):
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self._max_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        """Forget everything: the replica restarted, so its engine's cache is empty."""
        self._blocks.clear()


def _weight(key: bytes, name: str) -> int:
    digest = hashlib.blake2b(key, digest_size=_DIGEST, person=_RENDEZVOUS_PERSON)
    digest.update(name.encode("utf-8", "surrogatepass"))
    return int.from_bytes(digest.digest(), "big")


def rendezvous(key: str, names: Sequence[str]) -> int:
    """Index in `names` of the winner of rendezvous (highest random weight) hashing for `key`: removing a name
    moves only the keys that name won. Deterministic across processes (blake2b, not hash())."""
    if not names:
        raise ValueError("rendezvous needs at least one name")
    raw = key.encode("utf-8", "surrogatepass")
    prefix = len(raw).to_bytes(8, "big") + raw  # the length keeps (key, name) pairs from running together
    weights = [_weight(prefix, name) for name in names]
    return weights.index(max(weights))


@dataclass(frozen=True)
class Candidate:
    """One replica that could take the request, as the choice sees it."""

    name: str  # "<worker>/<index>": stable across restarts of the replica
    load: float  # requests in flight (+ the engine's waiting count when known)
    matched: int = 0  # blocks of this prompt its index holds
    index_bytes: int = 0  # size of its prefix index
    kv_full: bool = False  # its engine reports KV cache usage above 0.95


@dataclass(frozen=True)
class PrefixRule:
    """The thresholds of the cache-aware rule (DESIGN `routing.prefix`)."""

    min_match: float = 0.3
    balance_abs: float = 8
    balance_rel: float = 1.5


def _least_of(indexes: Sequence[int], cands: Sequence[Candidate], rr: int) -> int:
    """The least loaded of `indexes`; ties round robin from rr."""
    low = min(cands[i].load for i in indexes)
    tied = [i for i in indexes if cands[i].load == low]
    return tied[rr % len(tied)]


def choose_least(cands: Sequence[Candidate], rr: int) -> int:
    """Least loaded; ties round robin from rr (rr % number of tied)."""
    return _least_of(range(len(cands)), cands, rr)


def choose_session(key: str, cands: Sequence[Candidate]) -> int:
    """The session's replica: rendezvous over the candidates' names."""
    return rendezvous(key, [c.name for c in cands])


def choose_prefix(cands: Sequence[Candidate], total_blocks: int, rule: PrefixRule, rr: int) -> tuple[int, str]:
    """SGLang's cache-aware rule: an unbalanced pool gets the least loaded (BALANCE); else the longest match when
    it covers min_match of the prompt (PREFIX_HIT); else the smallest prefix index (PREFIX_MISS).

    Ties at every step go to the least loaded, then round robin from rr, so a match every candidate shares
    decides nothing by itself. A prompt under one block (total_blocks 0) goes to the least loaded as a miss;
    a hit needs at least one block matched.
    """
    loads = [c.load for c in cands]
    high, low = max(loads), min(loads)
    if high - low > rule.balance_abs and high > rule.balance_rel * low:
        return choose_least(cands, rr), BALANCE
    if total_blocks <= 0:
        return choose_least(cands, rr), PREFIX_MISS
    best = max(c.matched for c in cands)
    if best > 0 and best / total_blocks >= rule.min_match:
        return _least_of([i for i, c in enumerate(cands) if c.matched == best], cands, rr), PREFIX_HIT
    smallest = min(c.index_bytes for c in cands)
    return _least_of([i for i, c in enumerate(cands) if c.index_bytes == smallest], cands, rr), PREFIX_MISS


def avoid_full(cands: Sequence[Candidate]) -> list[int]:
    """Indexes of the candidates to consider: those whose KV cache has room, unless none has (then all)."""
    roomy = [i for i, c in enumerate(cands) if not c.kv_full]
    return roomy or list(range(len(cands)))
