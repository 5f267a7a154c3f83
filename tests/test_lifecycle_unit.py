"""Pure lifecycle decisions: the state table, backoff, exit classification, crash loops. No clock."""

from __future__ import annotations

import signal

import pytest

from supervisor.fleet.process import (
    ExitEvidence,
    backoff_delay,
    classify_exit,
    counter_value,
    crash_loop_clears_at,
    in_crash_loop,
)
from supervisor.states import WORKER_MOVES, ExitReason, IllegalTransition, WorkerState, check_move

W = WorkerState


def why(*args, **kw) -> ExitReason:
    return classify_exit(ExitEvidence(*args, **kw))


def test_every_state_has_moves_and_targets_are_states():
    assert set(WORKER_MOVES) == set(WorkerState)
    for targets in WORKER_MOVES.values():
        assert targets <= set(WorkerState)


@pytest.mark.parametrize("old, new", [
    (W.STOPPED, W.STARTING), (W.STARTING, W.READY), (W.READY, W.BUSY), (W.BUSY, W.READY),
    (W.READY, W.DRAINING), (W.DRAINING, W.STOPPING), (W.STOPPING, W.STARTING), (W.READY, W.BACKOFF),
    (W.BACKOFF, W.STARTING), (W.BACKOFF, W.FAILED), (W.FAILED, W.STARTING), (W.STARTING, W.BACKOFF),
])
def test_legal_moves(old, new):
    check_move(old, new)


@pytest.mark.parametrize("old, new", [
    (W.STOPPED, W.READY), (W.BACKOFF, W.READY), (W.FAILED, W.READY), (W.STARTING, W.BUSY),
    (W.DRAINING, W.READY), (W.STOPPED, W.BUSY),
])
def test_illegal_moves_raise(old, new):
    with pytest.raises(IllegalTransition):
        check_move(old, new)


def test_backoff_grows_exponentially_with_jitter_and_caps():
    lo = [backoff_delay(n, 0.5, 30, 0.0) for n in range(1, 10)]
    hi = [backoff_delay(n, 0.5, 30, 1.0) for n in range(1, 10)]
    assert lo[:4] == [0.25, 0.5, 1.0, 2.0]
    assert hi[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(hi) == 30 and max(lo) == 15
    assert all(a <= b for a, b in zip(hi, hi[1:]))


def test_classify_our_own_stop_wins():
    for reason in (ExitReason.HANG, ExitReason.RECYCLE, ExitReason.PRESSURE, ExitReason.RELOAD):
        assert why(-9, reason, True, True, ["CUDA out of memory"], True) is reason


def test_classify_oom_from_tail():
    tail = ["Traceback (most recent call last):", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate"]
    assert why(1, None, False, True, tail, False) is ExitReason.OOM
    assert why(1, None, False, False, tail, False) is ExitReason.OOM  # even before ready


def test_classify_sigkill_we_did_not_send_needs_a_sign_to_be_oom():
    # no sign of OOM: somebody killed it
    assert why(-signal.SIGKILL, None, False, True, [], False) is ExitReason.KILLED
    # the kernel's oom_kill counter moved while it ran, or it answered OOM just before
    assert why(-signal.SIGKILL, None, False, True, [], False, kernel_oom_kill=True) is ExitReason.OOM
    assert why(-signal.SIGKILL, None, False, True, [], True) is ExitReason.OOM
    assert why(-signal.SIGKILL, None, False, True, ["CUDA out of memory"], False) is ExitReason.OOM


def test_counter_value_reads_prometheus_text():
    text = (b"# HELP tokens_total generated\n# TYPE tokens_total counter\n"
            b'tokens_total{model="a"} 3\ntokens_total{model="b"} 4.5\nother 9\n')
    assert counter_value(text, "tokens") == 7.5
    assert counter_value(text, "tokens_total") == 7.5
    assert counter_value(text, "missing") is None


def test_classify_crash_and_start_failure():
    assert why(3, None, False, True, ["boom"], False) is ExitReason.CRASH
    assert why(-signal.SIGSEGV, None, False, True, [], False) is ExitReason.CRASH
    assert why(1, None, False, False, ["ImportError: no module"], False) is ExitReason.START_FAILURE


def test_classify_oom_answer_just_before_death():
    assert why(1, None, False, True, [], True) is ExitReason.OOM


def test_crash_loop_counts_only_the_window():
    failures = [0.0, 1.0, 2.0, 3.0]
    assert not in_crash_loop(failures, 3.0, 10.0, 4)
    assert in_crash_loop(failures, 3.0, 10.0, 3)
    assert not in_crash_loop(failures, 11.5, 10.0, 3)  # the first two left the window
    assert crash_loop_clears_at(failures, 10.0, 3) == 10.0
    assert crash_loop_clears_at([5.0], 10.0, 3) == 0.0


def test_the_readme_lists_every_exit_reason():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("Exit reasons:")
    listed = readme[start:readme.index("\n- ", start)]
    assert [r.value for r in ExitReason if f"`{r.value}`" not in listed] == []


def test_the_readme_error_table_lists_every_answer_the_daemon_makes_with_its_status():
    """Every error type the daemon answers with (its own, and a job's at /jobs/{id}/result) is in the
    README's table, with its status: what a client may get is written down."""
    import re
    from pathlib import Path

    from supervisor.errors import ERROR_TYPES
    from supervisor.jobs.api import JOB_ERROR_STATUS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        m = re.match(r"^\| (.+?) \| (\d{3}) \|", line)
        if m:
            for etype in re.findall(r"`([a-z_]+)`", m.group(1)):
                rows.setdefault(etype, int(m.group(2)))
    want = {**{t: s for t, (s, _) in ERROR_TYPES.items()}, **JOB_ERROR_STATUS}
    assert {t: rows.get(t) for t in want} == want
