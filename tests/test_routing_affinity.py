"""Replica choice for session and prefix affinity: the prompt, its blocks, the prefix index, rendezvous hashing
and the cache-aware rule, all tested with plain values and hypothesis properties."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from supervisor.routing.affinity import (
    BALANCE,
    BLOCK_BYTES,
    PREFIX_HIT,
    PREFIX_MISS,
    Candidate,
    PrefixIndex,
    PrefixRule,
    avoid_full,
    choose_least,
    choose_prefix,
    choose_session,
    prompt_blocks,
    prompt_text,
    rendezvous,
)

RULE = PrefixRule()  # min_match 0.3, balance_abs 8, balance_rel 1.5

# ---- prompt_text ----


def test_prompt_string_and_list() -> None:
    assert prompt_text({"prompt": "hello"}) == "hello"
    assert prompt_text({"prompt": ["a", "b", "c"]}) == "a\nb\nc"
    assert prompt_text({"prompt": "p", "messages": [{"role": "user", "content": "m"}]}) == "p"


def test_messages_with_string_and_parts_content() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                    {"type": "text", "text": "here"},
                ],
            },
            {"role": "assistant", "content": None},
        ]
    }
    assert prompt_text(body) == "system\nbe brief\nuser\nlook\nhere\nassistant\n\n"


def test_message_order_matters() -> None:
    a = {"role": "user", "content": "one"}
    b = {"role": "user", "content": "two"}
    assert prompt_text({"messages": [a, b]}) != prompt_text({"messages": [b, a]})


@pytest.mark.parametrize(
    "body",
    [{}, {"model": "m", "input": "x"}, {"prompt": [1, 2, 3]}, {"messages": "not a list"}, None, "text", [1], 3],
)
def test_no_prompt(body: object) -> None:
    assert prompt_text(body) is None


# ---- prompt_blocks ----


def test_blocks_count_full_blocks_of_utf8_bytes() -> None:
    assert prompt_blocks("x" * (BLOCK_BYTES - 1)) == []
    assert len(prompt_blocks("x" * BLOCK_BYTES)) == 1
    assert len(prompt_blocks("x" * (3 * BLOCK_BYTES + 5))) == 3
    assert len(prompt_blocks("é" * 40, block_bytes=16)) == 5  # 80 bytes
    assert all(len(h) == len(prompt_blocks("y" * BLOCK_BYTES)[0]) for h in prompt_blocks("z" * 200))


def test_block_hash_covers_the_blocks_before_it() -> None:
    # the same second block after different first blocks hashes differently
    a = prompt_blocks("a" * 8 + "c" * 8, block_bytes=8)
    b = prompt_blocks("b" * 8 + "c" * 8, block_bytes=8)
    assert a[1] != b[1]


texts = st.text(max_size=300)


@given(texts, texts, st.integers(1, 32))
def test_shared_prefix_shares_leading_hashes(a: str, b: str, block: int) -> None:
    head = prompt_blocks(a, block)
    assert prompt_blocks(a + b, block)[: len(head)] == head


@given(st.text(min_size=8, max_size=100), st.text(min_size=8, max_size=100))
def test_different_first_block_shares_nothing(a: str, b: str) -> None:
    ra, rb = a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    assume(ra[:8] != rb[:8])
    assert not set(prompt_blocks(a, 8)) & set(prompt_blocks(b, 8))


# ---- PrefixIndex ----

BLOCK = 4  # small blocks keep the index tests readable


def blocks(text: str) -> list[bytes]:
    return prompt_blocks(text, BLOCK)


@settings(max_examples=200)
@given(
    st.integers(0, 40),
    st.lists(st.lists(st.binary(min_size=1, max_size=2), max_size=12) | st.text(max_size=60).map(blocks)),
)
def test_index_never_exceeds_its_bound(max_bytes: int, inserts: list[list[bytes]]) -> None:
    index = PrefixIndex(max_bytes, BLOCK)
    for prompt in inserts:
        index.insert(prompt)
        assert index.size_bytes <= max_bytes
        assert index.size_bytes == len(index) * BLOCK
        assert index.match(prompt) <= len(prompt)


def test_recently_used_prompts_survive_eviction() -> None:
    a, b, c = blocks("aaaaaaaa"), blocks("bbbbbbbb"), blocks("cccccccc")  # two blocks each
    index = PrefixIndex(4 * BLOCK, BLOCK)
    index.insert(a)
    index.insert(b)
    assert index.match(a) == 2
    index.insert(a)  # a was routed again: now the most recent
    index.insert(c)
    assert (index.match(a), index.match(b), index.match(c)) == (2, 0, 2)


def test_match_alone_touches_nothing() -> None:
    a, b, c = blocks("aaaaaaaa"), blocks("bbbbbbbb"), blocks("cccccccc")
    index = PrefixIndex(4 * BLOCK, BLOCK)
    index.insert(a)
    index.insert(b)
    assert index.match(a) == 2
    index.insert(c)
    assert (index.match(a), index.match(b), index.match(c)) == (0, 2, 2)


def test_eviction_drops_the_ends_of_prompts_first() -> None:
    index = PrefixIndex(3 * BLOCK, BLOCK)
    long = blocks("0123456789abcdefghij")  # five blocks, more than the index holds
    index.insert(long)
    assert index.match(long) == 3
    old = blocks("zzzzyyyy")
    index = PrefixIndex(3 * BLOCK, BLOCK)
    index.insert(old)
    index.insert(blocks("wwww"))
    index.insert(blocks("vvvv"))  # one block over: the end of the old prompt goes, its start stays
    assert index.match(old) == 1


def test_match_counts_only_leading_blocks() -> None:
    index = PrefixIndex(1024, BLOCK)
    index.insert(blocks("system: be brief. user: hi"))
    assert index.match(blocks("system: be brief. user: hello there")) == len(blocks("system: be brief. user: h"))
    assert index.match(blocks("other: be brief. user: hi")) == 0
    index.insert([b"second"])
    assert index.match([b"first", b"second"]) == 0


def test_clear_forgets_everything() -> None:
    index = PrefixIndex(1024, BLOCK)
    prompt = blocks("a prompt of several blocks")
    index.insert(prompt)
    assert len(index) == len(prompt) > 0
    index.clear()
    assert (len(index), index.size_bytes, index.match(prompt)) == (0, 0, 0)


def test_index_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(-1)
    with pytest.raises(ValueError):
        PrefixIndex(100, 0)


# ---- rendezvous ----

names_st = st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=8, unique=True)
keys_st = st.lists(st.text(max_size=20), min_size=1, max_size=40)


@given(names_st, keys_st, st.data())
def test_removing_a_name_moves_only_its_keys(names: list[str], keys: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(names))
    rest = [n for n in names if n != gone]
    for key in keys:
        before = names[rendezvous(key, names)]
        if before != gone:
            assert rest[rendezvous(key, rest)] == before


@given(names_st, keys_st, st.text(min_size=1, max_size=12))
def test_adding_a_name_moves_keys_only_to_it(names: list[str], keys: list[str], new: str) -> None:
    assume(new not in names)
    grown = [*names, new]
    for key in keys:
        after = grown[rendezvous(key, grown)]
        assert after in (names[rendezvous(key, names)], new)


def test_rendezvous_spreads_keys() -> None:
    names = ["chat/0", "chat/1", "chat/2", "chat/3"]
    counts = Counter(rendezvous(f"session-{i}", names) for i in range(1000))
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 150


def test_rendezvous_ignores_name_order() -> None:
    names = ["chat/0", "chat/1", "chat/2"]
    for i in range(50):
        assert names[rendezvous(str(i), names)] == names[::-1][rendezvous(str(i), names[::-1])]


def test_hashes_are_the_same_in_another_process() -> None:
    names = ["chat/0", "chat/1", "chat/2", "chat/3"]
    here = [[rendezvous(f"k{i}", names) for i in range(20)], [h.hex() for h in prompt_blocks("p" * 300)]]
    code = (
        "import json; from supervisor.routing.affinity import prompt_blocks, rendezvous; "
        f"names = {names!r}; "
        "print(json.dumps([[rendezvous(f'k{i}', names) for i in range(20)], "
        "[h.hex() for h in prompt_blocks('p' * 300)]]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert json.loads(out.stdout) == here


def test_rendezvous_needs_a_name() -> None:
    with pytest.raises(ValueError):
        rendezvous("k", [])


def test_choose_session_is_rendezvous_over_names() -> None:
    cands = [Candidate(f"chat/{i}", load=i) for i in range(4)]
    for i in range(30):
        chosen = choose_session(f"user-{i}", cands)
        assert chosen == rendezvous(f"user-{i}", [c.name for c in cands])
        # load plays no part, and another replica leaving keeps the session where it was
        leaving = next(c for c in cands if c is not cands[chosen])
        kept = [c for c in cands if c is not leaving]
        assert kept[choose_session(f"user-{i}", kept)] is cands[chosen]


# ---- choose_least ----


def test_choose_least_round_robin_over_ties() -> None:
    cands = [Candidate("w/0", 1), Candidate("w/1", 0), Candidate("w/2", 0), Candidate("w/3", 2), Candidate("w/4", 0)]
    assert [choose_least(cands, rr) for rr in range(6)] == [1, 2, 4, 1, 2, 4]


@given(st.lists(st.integers(0, 4), min_size=1, max_size=8), st.integers(0, 1000))
def test_choose_least_is_least_and_rotates(loads: list[int], rr: int) -> None:
    cands = [Candidate(f"w/{i}", float(load)) for i, load in enumerate(loads)]
    tied = [i for i, load in enumerate(loads) if load == min(loads)]
    assert cands[choose_least(cands, rr)].load == min(loads)
    assert sorted(choose_least(cands, rr + k) for k in range(len(tied))) == tied


# ---- choose_prefix ----


@st.composite
def pools(draw: st.DrawFn, max_load: int = 8) -> tuple[list[Candidate], int]:
    total = draw(st.integers(1, 10))
    n = draw(st.integers(1, 6))
    cands = [
        Candidate(
            f"w/{i}",
            load=float(draw(st.integers(0, max_load))),
            matched=draw(st.integers(0, total)),
            index_bytes=draw(st.sampled_from([0, 64, 640])),
        )
        for i in range(n)
    ]
    return cands, total


# loads within 0..8 never differ by more than balance_abs 8: the pool is balanced
@given(pools(), st.integers(0, 100))
def test_balanced_pool_prefers_the_longest_match(pool: tuple[list[Candidate], int], rr: int) -> None:
    cands, total = pool
    best = max(c.matched for c in cands)
    assume(best > 0 and best / total >= RULE.min_match)
    chosen, decision = choose_prefix(cands, total, RULE, rr)
    assert decision == PREFIX_HIT
    assert cands[chosen].matched == best
    assert cands[chosen].load == min(c.load for c in cands if c.matched == best)


@given(pools(), st.integers(0, 100))
def test_short_match_goes_to_the_smallest_index(pool: tuple[list[Candidate], int], rr: int) -> None:
    cands, total = pool
    assume(max(c.matched for c in cands) / total < RULE.min_match)
    chosen, decision = choose_prefix(cands, total, RULE, rr)
    smallest = min(c.index_bytes for c in cands)
    assert decision == PREFIX_MISS
    assert cands[chosen].index_bytes == smallest
    assert cands[chosen].load == min(c.load for c in cands if c.index_bytes == smallest)


@given(pools(max_load=40), st.integers(0, 100))
def test_unbalanced_pool_goes_to_the_least_loaded(pool: tuple[list[Candidate], int], rr: int) -> None:
    cands, total = pool
    high, low = max(c.load for c in cands), min(c.load for c in cands)
    assume(high - low > RULE.balance_abs and high > RULE.balance_rel * low)
    chosen, decision = choose_prefix(cands, total, RULE, rr)
    assert decision == BALANCE
    assert cands[chosen].load == low


@given(pools(max_load=40), st.integers(0, 10), st.integers(0, 100))
def test_a_match_all_share_decides_nothing(pool: tuple[list[Candidate], int], shared: int, rr: int) -> None:
    cands, total = pool
    same = [Candidate(c.name, c.load, min(shared, total), index_bytes=64) for c in cands]
    chosen, _ = choose_prefix(same, total, RULE, rr)
    assert chosen == choose_least(same, rr)


@given(pools(max_load=40), st.integers(0, 100))
def test_prompt_under_one_block_is_a_miss_to_the_least_loaded(pool: tuple[list[Candidate], int], rr: int) -> None:
    cands, _ = pool
    high, low = max(c.load for c in cands), min(c.load for c in cands)
    assume(not (high - low > RULE.balance_abs and high > RULE.balance_rel * low))
    assert choose_prefix(cands, 0, RULE, rr) == (choose_least(cands, rr), PREFIX_MISS)


def test_imbalance_needs_both_thresholds() -> None:
    cached = Candidate("w/0", load=29, matched=5, index_bytes=640)
    idle = Candidate("w/1", load=20, matched=0, index_bytes=0)
    # 29 - 20 > 8 but 29 <= 1.5 x 20: balanced, the cached prefix wins despite the load
    assert choose_prefix([cached, idle], 10, RULE, 0) == (0, PREFIX_HIT)
    busy = Candidate("w/0", load=9, matched=5, index_bytes=640)
    fresh = Candidate("w/1", load=0)
    assert choose_prefix([busy, fresh], 10, RULE, 0) == (1, BALANCE)
    # 9 - 2 <= 8: balanced again
    assert choose_prefix([busy, Candidate("w/1", load=2)], 10, RULE, 0) == (0, PREFIX_HIT)


def test_hit_threshold_is_inclusive_and_needs_a_match() -> None:
    cands = [Candidate("w/0", 3, matched=3, index_bytes=640), Candidate("w/1", 0, index_bytes=0)]
    assert choose_prefix(cands, 10, RULE, 0) == (0, PREFIX_HIT)
    assert choose_prefix(cands, 11, RULE, 0) == (1, PREFIX_MISS)
    nothing = [Candidate("w/0", 3, index_bytes=640), Candidate("w/1", 1, index_bytes=640)]
    assert choose_prefix(nothing, 10, PrefixRule(min_match=0.0), 0) == (1, PREFIX_MISS)


# ---- avoid_full ----


def test_avoid_full() -> None:
    roomy, full = Candidate("w/0", 0), Candidate("w/1", 0, kv_full=True)
    assert avoid_full([full, roomy, full, roomy]) == [1, 3]
    assert avoid_full([full, full]) == [0, 1]
    assert avoid_full([roomy, roomy]) == [0, 1]
    assert avoid_full([]) == []
