"""The request queue's decisions with plain values: order, bounds, pools, cancellation, estimates.

No clock and no running event loop: a fresh loop only makes the futures that waiting tickets carry,
and a granted ticket is one whose state is GRANTED (its future then holds a result).
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from supervisor.config import Queue as QueueSettings
from supervisor.request_queue import CANCELLED, DONE, GRANTED, WAITING, QueueFull, RequestQueue, Ticket

PRIOS = ("critical", "high", "normal", "low")
CRIT, HIGH, NORMAL, LOW = range(4)


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def make(loop, open_: bool = True, **kw) -> RequestQueue:
    kw.setdefault("concurrency", 1)
    q = RequestQueue(QueueSettings(**kw), loop)
    q.open = open_
    return q


def granted(t: Ticket) -> bool:
    return t.state == GRANTED and (t.future is None or (t.future.done() and not t.future.cancelled()))


def release_next(q: RequestQueue, holder: Ticket, waiting: list[Ticket]) -> Ticket:
    """Give back `holder`'s slot; return the one ticket of `waiting` that got it."""
    q.release(holder, None)
    got = [t for t in waiting if t.state == GRANTED]
    assert len(got) == 1, got
    waiting.remove(got[0])
    return got[0]


# ---- grant, order ---------------------------------------------------------------------------------

def test_free_slot_is_granted_at_once_without_a_future(loop):
    q = make(loop)
    t = q.acquire(NORMAL, "default", now=0.0)
    assert t.state == GRANTED and t.future is None
    assert q.inflight() == 1 and q.total == 0


def test_closed_queue_holds_everything_until_opened(loop):
    q = make(loop, open_=False, concurrency=2)
    a = q.acquire(LOW, "default", 0.0)
    b = q.acquire(HIGH, "default", 0.1)
    c = q.acquire(NORMAL, "default", 0.2)
    assert [t.state for t in (a, b, c)] == [WAITING] * 3
    assert q.depth_by_name() == {"critical": 0, "high": 1, "normal": 1, "low": 1}
    q.open = True
    q.pump()
    assert granted(b) and granted(c) and a.state == WAITING  # two slots: the two highest levels
    assert q.inflight() == 2 and q.total == 1


def test_higher_level_first_then_fifo_within_a_level(loop):
    q = make(loop)
    holder = q.acquire(NORMAL, "default", 0.0)
    order = [(LOW, "l1"), (NORMAL, "n1"), (LOW, "l2"), (CRIT, "c1"), (HIGH, "h1"), (NORMAL, "n2"), (HIGH, "h2"),
             (LOW, "l3")]
    names = {}
    waiting = []
    for i, (lvl, name) in enumerate(order):
        t = q.acquire(lvl, "default", float(i))
        names[id(t)] = name
        waiting.append(t)
    served = []
    while waiting:
        holder = release_next(q, holder, waiting)
        served.append(names[id(holder)])
    assert served == ["c1", "h1", "h2", "n1", "n2", "l1", "l2", "l3"]


def test_a_waiting_pool_is_not_overtaken_by_a_newcomer(loop):
    q = make(loop)
    holder = q.acquire(NORMAL, "default", 0.0)
    w = q.acquire(LOW, "default", 1.0)
    q.release(holder, None)
    assert granted(w)
    # the slot is taken again; a newcomer of a higher level waits, it does not jump a granted one
    n = q.acquire(CRIT, "default", 2.0)
    assert n.state == WAITING


# ---- bounds -----------------------------------------------------------------------------------

def test_level_bound_then_total_bound(loop):
    q = make(loop, max_size=4, levels={"low": {"max_size": 2}})
    q.acquire(NORMAL, "default", 0.0)  # holds the slot
    q.acquire(LOW, "default", 0.0)
    q.acquire(LOW, "default", 0.0)
    with pytest.raises(QueueFull) as e:
        q.acquire(LOW, "default", 0.0)
    assert e.value.scope == "level"
    with pytest.raises(QueueFull) as e:
        q.check_room(LOW)
    assert e.value.scope == "level"
    q.acquire(HIGH, "default", 0.0)
    q.acquire(HIGH, "default", 0.0)
    with pytest.raises(QueueFull) as e:
        q.acquire(CRIT, "default", 0.0)
    assert e.value.scope == "total"
    assert q.total == 4


def test_a_rejected_acquire_leaves_no_trace(loop):
    q = make(loop, max_size=1)
    q.acquire(NORMAL, "default", 0.0)
    w = q.acquire(NORMAL, "default", 0.0)
    with pytest.raises(QueueFull):
        q.acquire(HIGH, "default", 0.0)
    assert q.total == 1 and q.depth_by_name()["high"] == 0
    q.cancel(w)
    q.check_room(HIGH)  # a cancelled ticket gives its room back at once
    assert q.total == 0


def test_front_goes_first_in_its_level_and_skips_the_bounds(loop):
    q = make(loop, max_size=1)
    holder = q.acquire(NORMAL, "default", 0.0)
    a = q.acquire(NORMAL, "default", 1.0)
    retried = q.acquire(NORMAL, "default", 0.5, front=True)  # admitted already: the bound does not apply
    hi = q.acquire(HIGH, "default", 2.0, front=True)
    assert q.total == 3
    waiting = [a, retried, hi]
    holder = release_next(q, holder, waiting)
    assert holder is hi  # a retry goes to the front of ITS level only
    holder = release_next(q, holder, waiting)
    assert holder is retried
    assert release_next(q, holder, waiting) is a


# ---- leaving ----------------------------------------------------------------------------------

def test_cancel_while_waiting_drops_the_place_and_is_never_granted(loop):
    q = make(loop)
    holder = q.acquire(NORMAL, "default", 0.0)
    a = q.acquire(NORMAL, "default", 1.0)
    b = q.acquire(NORMAL, "default", 2.0)
    q.cancel(a)
    assert a.state == CANCELLED and q.total == 1 and q.depth_by_name()["normal"] == 1
    q.cancel(a)  # twice is harmless
    assert q.total == 1
    q.release(holder, None)
    assert granted(b) and a.state == CANCELLED and not a.future.done()


def test_cancel_of_a_granted_ticket_frees_its_slot_for_the_next(loop):
    q = make(loop)
    holder = q.acquire(NORMAL, "default", 0.0)
    nxt = q.acquire(LOW, "default", 1.0)
    q.cancel(holder)  # the client left while running
    assert holder.state == DONE and granted(nxt)
    q.release(holder, 5.0)  # the late release of the same ticket changes nothing
    assert q.inflight() == 1 and q.pools["default"].svc_ewma == 0.0


def test_granted_then_cancelled_in_the_same_tick_gives_the_slot_on(loop):
    """The grant and the client's timeout can race: the grant is then handed back, not lost."""
    q = make(loop)
    holder = q.acquire(NORMAL, "default", 0.0)
    a = q.acquire(NORMAL, "default", 1.0)
    b = q.acquire(NORMAL, "default", 2.0)
    q.release(holder, None)
    assert granted(a)
    q.cancel(a)  # its waiter timed out before it could run
    assert granted(b) and q.inflight() == 1


def test_cancelled_heads_of_a_higher_level_do_not_block_a_lower_one(loop):
    q = make(loop)
    holder = q.acquire(NORMAL, "default", 0.0)
    highs = [q.acquire(HIGH, "default", 1.0) for _ in range(3)]
    low = q.acquire(LOW, "default", 2.0)
    for t in highs:
        q.cancel(t)
    q.release(holder, None)
    assert granted(low)
    assert q.total == 0


# ---- pools ------------------------------------------------------------------------------------

def test_a_full_pool_never_blocks_another(loop):
    q = make(loop, pools={"cpu": {"concurrency": 2}})
    gpu = q.acquire(NORMAL, "default", 0.0)
    gpu_waiting = [q.acquire(HIGH, "default", 0.0) for _ in range(5)]
    cpu = [q.acquire(LOW, "cpu", 0.0) for _ in range(2)]
    assert all(granted(t) for t in cpu)  # even lower priority: another pool's slots
    third = q.acquire(LOW, "cpu", 0.0)
    assert third.state == WAITING
    q.release(cpu[0], None)
    assert granted(third)
    assert all(t.state == WAITING for t in gpu_waiting) and granted(gpu)
    assert q.pools["cpu"].in_use == 2 and q.pools["default"].in_use == 1


def test_bounds_are_global_across_pools(loop):
    q = make(loop, max_size=3, levels={"low": {"max_size": 2}}, pools={"cpu": {"concurrency": 1}})
    q.acquire(NORMAL, "default", 0.0)
    q.acquire(NORMAL, "cpu", 0.0)
    q.acquire(LOW, "default", 0.0)
    q.acquire(LOW, "cpu", 0.0)
    with pytest.raises(QueueFull) as e:
        q.acquire(LOW, "cpu", 0.0)
    assert e.value.scope == "level"
    q.acquire(HIGH, "cpu", 0.0)
    with pytest.raises(QueueFull) as e:
        q.acquire(HIGH, "default", 0.0)
    assert e.value.scope == "total"


def test_gpu_memory_gate_keeps_order(loop):
    q = make(loop, concurrency=4)
    free = {"mb": 100}
    q.fits = lambda mb: mb <= free["mb"]
    big = q.acquire(NORMAL, "default", 0.0, gpu_mb=500)
    assert big.state == WAITING  # slots are free, memory is not
    small = q.acquire(NORMAL, "default", 1.0, gpu_mb=10)
    assert small.state == WAITING  # does not overtake the head that waits for memory
    free["mb"] = 1000
    q.pump()
    assert granted(big) and granted(small)


# ---- reconfiguration ----------------------------------------------------------------------------

def test_reconfigure_keeps_waiters_by_level_name_and_folds_removed_pools(loop):
    q = make(loop, pools={"cpu": {"concurrency": 1}})
    q.acquire(NORMAL, "default", 0.0)
    q.acquire(NORMAL, "cpu", 0.0)
    lo = q.acquire(LOW, "default", 1.0)
    crit = q.acquire(CRIT, "default", 2.0)
    cpu_hi = q.acquire(HIGH, "cpu", 3.0)
    # "critical" is gone (its waiters take the default level), "cpu" is gone (its waiters join default)
    q.configure(QueueSettings(concurrency=1, priorities=("high", "normal", "low"), default_priority="normal"))
    assert q.depth_by_name() == {"high": 1, "normal": 1, "low": 1}
    assert (crit.level, cpu_hi.level, lo.level) == (1, 0, 2)
    assert cpu_hi.pool is q.pools["default"] and set(q.pools) == {"default"}
    assert q.ahead_of(2, "default") == 3


def _fair(**kw) -> dict:
    return {"key": "header:X-Client-ID"} | kw


def _order(q: RequestQueue, holder: Ticket, waiting: list[Ticket]) -> list[Ticket]:
    out = []
    while waiting:
        holder = release_next(q, holder, waiting)
        out.append(holder)
    return out


def test_a_key_changes_nothing_with_fairness_off_but_stays_on_the_ticket(loop):
    q = make(loop)
    holder = q.acquire(NORMAL, "default", 0.0, key="k1")
    ts = [q.acquire(NORMAL, "default", float(i), key=key) for i, key in enumerate(["k1", "k1", "k2", None, "k2"])]
    assert [t.key for t in ts] == ["k1", "k1", "k2", None, "k2"]  # a job is submitted with its ticket's key
    q.check_room(NORMAL, "k1")  # no per-key bound when fairness is off
    assert _order(q, holder, list(ts)) == ts  # FIFO, keys or not
    assert q.fairness_status() == {} and q.key_depth == {}


def test_reconfigure_turns_fairness_on_and_off_keeping_every_waiter(loop):
    q = make(loop, max_size=50)
    holder = q.acquire(NORMAL, "default", 0.0)
    a = [q.acquire(NORMAL, "default", float(i), key="a") for i in range(4)]
    b = [q.acquire(NORMAL, "default", 10.0 + i, key="b") for i in range(2)]
    low = q.acquire(LOW, "default", 20.0)  # no key: the anonymous client once fairness is on
    q.configure(QueueSettings(concurrency=1, max_size=50, fairness=_fair(max_queued_per_key=4)))
    assert q.total == 7 and q.depth_by_name()["normal"] == 6 and low.key == "anonymous"
    assert q.key_depth == {"a": 4, "b": 2, "anonymous": 1}
    with pytest.raises(QueueFull) as e:
        q.acquire(NORMAL, "default", 30.0, key="a")
    assert e.value.scope == "key"
    waiting = a + b + [low]
    assert _order(q, holder, waiting[:])[:4] == [a[0], b[0], a[1], b[1]]  # round robin from now on
    # and back to one FIFO: the rest keep their order
    q2 = make(loop, max_size=50)
    holder = q2.acquire(NORMAL, "default", 0.0)
    a = [q2.acquire(NORMAL, "default", float(i), key="a") for i in range(3)]
    q2.configure(QueueSettings(concurrency=1, max_size=50, fairness=_fair()))
    b = [q2.acquire(NORMAL, "default", 10.0 + i, key="b") for i in range(3)]
    retried = q2.acquire(NORMAL, "default", 0.5, key="b", front=True)
    holder = release_next(q2, holder, [retried])
    holder = release_next(q2, holder, [a[0], b[0]])
    assert holder is a[0]
    q2.configure(QueueSettings(concurrency=1, max_size=50))
    assert q2.total == 5 and q2.fairness_status() == {}
    assert _order(q2, holder, a[1:] + b) == a[1:] + b  # arrival order across the keys


def test_reconfigure_with_fairness_keeps_retried_first_and_moves_keys_with_their_pool(loop):
    q = make(loop, pools={"cpu": {"concurrency": 1}}, fairness=_fair(weights={"x": 2}))
    holder = q.acquire(NORMAL, "default", 0.0)
    q.acquire(NORMAL, "cpu", 0.0)
    x = [q.acquire(NORMAL, "cpu", float(i), key="x") for i in range(2)]
    y = [q.acquire(NORMAL, "default", float(i), key="y") for i in range(2)]
    r = q.acquire(NORMAL, "default", 5.0, key="y", front=True)
    # the cpu pool is gone: its waiters join default; weights change
    q.configure(QueueSettings(concurrency=1, fairness=_fair(weights={"y": 3})))
    assert set(q.pools) == {"default"} and q.total == 5
    assert q.fairness_status()["normal"] == {"keys": 2, "largest_backlog": 3}
    order = _order(q, holder, [r] + x + y)
    assert order[0] is r  # the retried ticket is still first
    assert [t for t in order if t.key == "x"] == x and [t for t in order if t.key == "y"] == [r] + y


def test_fail_waiting_wakes_fair_tickets_too(loop):
    q = make(loop, fairness=_fair())
    q.acquire(NORMAL, "default", 0.0)
    ts = [q.acquire(lvl, "default", 0.0, key=key) for lvl, key in [(NORMAL, "a"), (LOW, "b"), (NORMAL, "b")]]
    ts.append(q.acquire(NORMAL, "default", 0.0, key="c", front=True))
    q.cancel(ts[1])
    q.fail_waiting(lambda: RuntimeError("gave up"))
    assert [t.future.done() for t in ts] == [True, False, True, True]
    for t in ts:
        q.cancel(t)
    assert q.total == 0 and q.fairness_status()["normal"] == {"keys": 0, "largest_backlog": 0}


# ---- estimates --------------------------------------------------------------------------------

def test_estimate_without_history_assumes_a_second_per_request(loop):
    q = make(loop, concurrency=2)
    assert q.estimate_wait(NORMAL, "default") == pytest.approx(0.5)


def test_estimate_is_position_times_service_time_over_slots(loop):
    q = make(loop, concurrency=2, pools={"cpu": {"concurrency": 4}})
    a = q.acquire(NORMAL, "default", 0.0)
    q.release(a, 0.4)  # the first sample is taken as it is
    assert q.pools["default"].svc_ewma == pytest.approx(0.4)
    b = q.acquire(NORMAL, "default", 0.0)
    q.release(b, 0.9)  # then smoothed: 0.8 * 0.4 + 0.2 * 0.9
    svc = 0.8 * 0.4 + 0.2 * 0.9
    assert q.pools["default"].svc_ewma == pytest.approx(svc)
    for _ in range(2):
        q.acquire(NORMAL, "default", 0.0)
    ts = [q.acquire(lvl, "default", 0.0) for lvl in (HIGH, HIGH, NORMAL, LOW, LOW, LOW)]
    # a newcomer at `normal` waits behind high and normal, not behind low
    assert q.ahead_of(NORMAL, "default") == 3
    assert q.estimate_wait(NORMAL, "default") == pytest.approx(4 * svc / 2)
    assert q.estimate_wait(LOW, "default") == pytest.approx(7 * svc / 2)
    q.cancel(ts[0])  # cancelled tickets still sit in the FIFO but are not counted
    assert q.estimate_wait(NORMAL, "default") == pytest.approx(3 * svc / 2)
    # another pool has its own position and its own rate
    assert q.ahead_of(LOW, "cpu") == 0
    assert q.estimate_wait(LOW, "cpu") == pytest.approx(1.0 / 4)


# ---- scale (functional, not timed) --------------------------------------------------------------

def test_ten_thousand_waiting_tickets(loop):
    n = 10_000
    q = make(loop, max_size=n, concurrency=1)
    holder = q.acquire(NORMAL, "default", 0.0)
    tickets = [q.acquire(i % 4, "default", float(i)) for i in range(n)]
    assert q.total == n
    with pytest.raises(QueueFull):
        q.acquire(LOW, "default", 0.0)
    # cancel all but every tenth; what is left keeps its order
    keep = [t for i, t in enumerate(tickets) if i % 10 == 0]
    for i, t in enumerate(tickets):
        if i % 10:
            q.cancel(t)
    assert q.total == len(keep) == 1000
    assert q.depth_by_name() == {name: sum(1 for i in range(0, n, 10) if i % 4 == lvl)
                                 for lvl, name in enumerate(PRIOS)}
    # lazy removal stays bounded: the FIFOs were compacted on the way
    assert sum(len(dq) for dq in q.pools["default"].levels) <= 3 * 1000 + 4 * 32
    expected = sorted(keep, key=lambda t: (t.level, t.enqueued_at))
    served = []
    for _ in range(len(keep)):
        q.release(holder, 0.01)
        holder = expected[len(served)]
        assert holder.state == GRANTED, f"ticket {len(served)} in priority/FIFO order was not the one granted"
        assert q.inflight() == 1
        served.append(holder)
    assert served == expected
    assert all(t.state == CANCELLED for i, t in enumerate(tickets) if i % 10)
    q.release(holder, None)
    assert q.drained()
    assert all(len(dq) == 0 for dq in q.pools["default"].levels)


def test_ten_thousand_cancelled_while_the_slot_is_held_leave_no_pile(loop):
    q = make(loop, max_size=100)
    q.acquire(NORMAL, "default", 0.0)  # a request that runs for a long time
    for i in range(10_000):
        t = q.acquire(LOW, "default", float(i))
        q.cancel(t)  # each waiter gives up (timeout, disconnect)
    assert q.total == 0
    assert len(q.pools["default"].levels[LOW]) == 0


# ---- property: nothing lost or duplicated, priority and FIFO order ------------------------------

class QueueMachine(RuleBasedStateMachine):
    """A model queue beside the real one: after every step, exactly the predicted tickets are granted."""

    fairness: dict = {}  # queue.fairness; a subclass runs the same model with fairness on

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.q = RequestQueue(QueueSettings(concurrency=2, max_size=12, priorities=("a", "b", "c"),
                                            default_priority="b", levels={"c": {"max_size": 5}},
                                            pools={"cpu": {"concurrency": 1}}, fairness=self.fairness), self.loop)
        self.q.open = True
        self.slots = {"default": 2, "cpu": 1}
        self.model: dict[str, list[deque[Ticket]]] = {p: [deque(), deque(), deque()] for p in self.slots}
        self.running: dict[str, list[Ticket]] = {p: [] for p in self.slots}
        self.all: list[Ticket] = []
        self.grants: dict[int, int] = {}
        self.seq = 0

    def teardown(self):
        # Everything still waiting is served once slots free up: nothing is left behind.
        self.q.open = True
        self.q.pump()
        self._check_grants()
        while any(self.running.values()):
            for pool, run in self.running.items():
                if run:
                    self._release(pool, 0)
        assert self.q.drained()
        for t in self.all:
            assert t.state in (DONE, CANCELLED)
            assert self.grants.get(id(t), 0) == (1 if t.state == DONE else 0)
        self.loop.close()

    # the model's pump: while a slot is free, the oldest ticket of the highest non-empty level
    def _predict(self, pool: str) -> list[Ticket]:
        out = []
        if not self.q.open:
            return out
        free = self.slots[pool] - len(self.running[pool])
        for dq in self.model[pool]:
            while dq and free:
                out.append(dq.popleft())
                free -= 1
        return out

    def _check_grants(self) -> None:
        for pool in self.slots:
            predicted = self._predict(pool)
            for t in predicted:
                assert t.state == GRANTED, "a slot is free but the model's next ticket was not granted"
                assert t.future.done()
                self.grants[id(t)] = self.grants.get(id(t), 0) + 1
                self.running[pool].append(t)
        for t in self.all:
            if t.state == GRANTED:
                assert any(t in run for run in self.running.values()), "granted a ticket out of order"

    def _release(self, pool: str, i: int) -> None:
        t = self.running[pool].pop(i)
        self.q.release(t, 0.01)
        assert t.state == DONE
        self._check_grants()

    @rule(level=st.integers(0, 2), pool=st.sampled_from(["default", "cpu"]), front=st.booleans())
    def acquire(self, level, pool, front):
        self.seq += 1
        before = self.q.total
        room = self.q.depth[level] < (5 if level == 2 else 12) and before < 12
        immediate = (self.q.open and not any(self.model[pool])
                     and len(self.running[pool]) < self.slots[pool])
        try:
            t = self.q.acquire(level, pool, float(self.seq), front=front)
        except QueueFull:
            assert not immediate and not front and not room
            assert self.q.total == before
            return
        # a retry (`front`) was admitted before and may pass the bounds; nothing else may
        assert immediate or front or room
        self.all.append(t)
        if immediate:
            assert t.state == GRANTED and t.future is None
            self.grants[id(t)] = 1
            self.running[pool].append(t)
        else:
            assert t.state == WAITING
            (self.model[pool][level].appendleft if front else self.model[pool][level].append)(t)
        self._check_grants()

    @precondition(lambda self: any(any(dq) for m in self.model.values() for dq in m))
    @rule(data=st.data())
    def cancel_waiting(self, data):
        waiting = [(p, lvl, t) for p, m in self.model.items() for lvl, dq in enumerate(m) for t in dq]
        pool, lvl, t = data.draw(st.sampled_from(waiting))
        self.model[pool][lvl].remove(t)
        self.q.cancel(t)
        assert t.state == CANCELLED and not t.future.done()
        self._check_grants()

    @precondition(lambda self: any(self.running.values()))
    @rule(data=st.data(), cancel=st.booleans())
    def finish_running(self, data, cancel):
        pool = data.draw(st.sampled_from([p for p, r in self.running.items() if r]))
        i = data.draw(st.integers(0, len(self.running[pool]) - 1))
        if cancel:  # the client left while running: cancel() gives the slot back like release()
            t = self.running[pool].pop(i)
            self.q.cancel(t)
            assert t.state == DONE
            self._check_grants()
        else:
            self._release(pool, i)

    @rule(open_=st.booleans())
    def set_open(self, open_):
        self.q.open = open_
        self.q.pump()
        self._check_grants()

    @invariant()
    def counts_match(self):
        depth = [sum(len(m[lvl]) for m in self.model.values()) for lvl in range(3)]
        assert self.q.depth == depth
        assert self.q.total == sum(depth)
        for pool, p in self.q.pools.items():
            assert p.in_use == len(self.running[pool]) <= self.slots[pool]
            assert p.waiting == sum(len(dq) for dq in self.model[pool])
            assert p.live == [len(dq) for dq in self.model[pool]]
            # FIFO within each level: the real queue's live tickets, in order, are the model's
            for lvl in range(3):
                assert [t for t in p.levels[lvl] if t.state == WAITING] == list(self.model[pool][lvl])
        assert all(v == 1 for v in self.grants.values())


QueueMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_queue_machine = QueueMachine.TestCase


class OneClientFairMachine(QueueMachine):
    """Fairness on, every request from one client (no key: the anonymous one): exactly today's order."""

    fairness = {"key": "header:X-Client-ID", "max_queued_per_key": 100}


OneClientFairMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None,
                                                  suppress_health_check=[HealthCheck.too_slow])
test_one_client_fair_machine = OneClientFairMachine.TestCase
