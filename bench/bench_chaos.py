"""Chaos benchmark: 10,000 mixed requests through a real daemon while its workers are killed, stopped and OOM.

A real gpu-supervisor runs one ctl worker (tests/workers/ctl_worker.py) with `--replicas` replicas.
`--clients` closed-loop clients, each on one kept-alive connection parsed strictly with httptools
(llhttp), send a fixed, seeded mix:

* GET /work?ms=..                     retry-safe (GET)
* GET /stream?n=..&interval=..        SSE; retry-safe until its first byte, then `event: error` on a death
* POST /v1/echo, bodies 0..256 KiB    retry-safe: a route says `retry: true`
* POST /echo, bodies 0..2 MiB         not retry-safe (POST; bodies over retry.max_body_bytes stream through)

while, until the load ends: a serving replica gets SIGKILL every `--kill-every` s, SIGSTOP every
`--stop-every` s, and GET /die-oom (the worker prints a CUDA OOM traceback and exits; a route makes
it not retry-safe so it kills one replica only) every `--oom-every` s.

Checked: 0 lost (every request got exactly one complete HTTP answer), 0 malformed (valid status line
and framing, an error answer is the typed JSON error, echoes carry the right body, an SSE stream ends
with `[DONE]` or with `event: error`), 0 aborted (a non-SSE answer cut short of its Content-Length
because the worker died mid-answer: detectable, as DESIGN allows, but not complete), every
retry-safe request answered 200, the daemon's
`gpu_supervisor_requests_total` (sum by code) equal to what the clients saw, and no fd or RSS growth
of the daemon (psutil, after a warm-up and after a settle).

    flock /tmp/bench.lock .venv/bin/python bench/bench_chaos.py [--requests 10000] [--clients 32]

Prints a table and writes bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httptools  # noqa: E402
import psutil  # noqa: E402

from bench.common import save_results  # noqa: E402
from tests.harness import SupervisorProcess, ctl_command, fast_config, kill_quiet, wait_until  # noqa: E402

RESULTS = REPO / "bench" / "results"
WORKER = "chaos"
MIB = 1 << 20
LIFECYCLE_KEYS = ("startup_timeout_s", "hang_timeout_s", "stop_grace_s", "health", "restart")
ERROR_TYPES = {"bad_request", "payload_too_large", "queue_full", "overloaded", "circuit_open", "queue_timeout",
               "worker_unavailable", "worker_crashed", "timeout", "worker_error", "shutting_down"}


# ---- the daemon's policy -------------------------------------------------------------------------

def policy(args: argparse.Namespace) -> dict:
    """fast_config()'s lifecycle for a fleet of one worker with replicas; deliberate faults are no crash loop."""
    base = fast_config(
        worker={"restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_restarts": 1_000_000,
                            "window_s": 60},
                "stall_timeout_s": args.stall_timeout},
        queue={"concurrency": args.concurrency, "max_size": 10_000, "timeout_s": 60},
        retry={"max_attempts": args.max_attempts},
        routes=[{"path": "/v1/", "methods": ["POST"], "retry": True},
                {"path": "/die-oom", "retry": False}],
    )
    worker = base.pop("worker")
    base["worker_defaults"] = {k: v for k, v in worker.items() if k != "command"}
    base["workers"] = {WORKER: {"command": ctl_command("--name", WORKER), "replicas": args.replicas,
                                "concurrency": args.concurrency}}
    if args.access_log:
        base["logging"]["access"] = True
    if args.breaker_min_calls:
        base["breaker"] = {"window": max(20, args.breaker_min_calls), "min_calls": args.breaker_min_calls}
    return base


# ---- the request mix -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Req:
    n: int
    kind: str            # work | stream | echo_retry | echo
    method: str
    target: str
    body: bytes
    retry_safe: bool
    stream_n: int = 0


BODY_SIZES_RETRY = (0, 64, 4096, 65536, 262144)
BODY_SIZES_PLAIN = (0, 64, 4096, 65536, 262144, 2 * MIB)


def make_requests(count: int, seed: int, max_retry_body: int) -> list[Req]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        x = rng.random()
        if x < 0.55:
            out.append(Req(n, "work", "GET", f"/work?ms={rng.choice((1, 5, 20, 50))}", b"", True))
        elif x < 0.70:
            k = rng.randint(3, 20)
            out.append(Req(n, "stream", "GET", f"/stream?n={k}&interval={rng.choice((0.01, 0.02, 0.05))}",
                           b"", True, k))
        elif x < 0.85:
            size = rng.choice(BODY_SIZES_RETRY)
            out.append(Req(n, "echo_retry", "POST", "/v1/echo", rng.randbytes(size), size <= max_retry_body))
        else:
            # 2 MiB is rare: one in 30 of these
            size = 2 * MIB if rng.random() < 1 / 30 else rng.choice(BODY_SIZES_PLAIN[:-1])
            out.append(Req(n, "echo", "POST", "/echo", rng.randbytes(size), False))
    return out


# ---- a strict HTTP/1.1 client over one kept-alive connection ----------------------------------------

@dataclasses.dataclass
class Answer:
    status: int | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    body: bytearray = dataclasses.field(default_factory=bytearray)
    begins: int = 0
    complete: bool = False
    keep_alive: bool = True
    error: str | None = None    # why the answer is not one complete HTTP answer


class _Parse:
    """httptools callbacks; a second message on the wire before we asked is counted, not merged."""

    def __init__(self) -> None:
        self.a = Answer()
        self.parser: httptools.HttpResponseParser | None = None

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.a.status = self.parser.get_status_code()

    def on_message_begin(self) -> None:
        self.a.begins += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.a.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.a.body += body

    def on_message_complete(self) -> None:
        self.a.complete = True


class Conn:
    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened = 0

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def request(self, method: str, target: str, body: bytes, rid: str, timeout: float) -> Answer:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.opened += 1
        cb = _Parse()
        parser = cb.parser = httptools.HttpResponseParser(cb)
        head = (f"{method} {target} HTTP/1.1\r\nHost: bench\r\nX-Request-ID: {rid}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        a = cb.a
        try:
            async with asyncio.timeout(timeout):
                self.writer.write(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    self.writer.write(body)
                await self.writer.drain()
                while not a.complete:
                    data = await self.reader.read(65536)
                    if not data:
                        a.error = "eof_before_status" if a.status is None and a.begins == 0 else "eof_mid_answer"
                        break
                    parser.feed_data(data)
                if a.complete:
                    a.keep_alive = parser.should_keep_alive()
        except httptools.HttpParserError as exc:
            a.error = f"parse_error: {exc}"
        except TimeoutError:
            a.error = "client_timeout"
        except (ConnectionError, OSError) as exc:
            a.error = "eof_before_status" if a.begins == 0 else f"conn_error_mid_answer: {exc!r}"
        if a.complete and a.begins > 1:
            a.error = "more_than_one_answer"
        if a.error is not None or not a.keep_alive:
            await self.close()
        else:
            await self._no_extra_bytes(a)
        return a

    async def _no_extra_bytes(self, a: Answer) -> None:
        """Bytes already waiting after a complete answer (before the next request) are a framing error."""
        assert self.reader is not None
        buffered = len(self.reader._buffer)  # type: ignore[attr-defined]  # what arrived past the message
        if buffered:
            a.error = f"extra_bytes_after_answer: {buffered}"
            await self.close()


# ---- judging one answer ----------------------------------------------------------------------------

SSE_DATA = re.compile(rb"^data: \{\"i\": (\d+)\}$", re.M)


def judge(req: Req, a: Answer) -> tuple[str, str | None]:
    """(outcome, detail): ok | typed_error | sse_done | sse_event_error | aborted_body | lost | malformed."""
    if a.error is not None:
        if a.status is None and a.begins == 0:
            return "lost", a.error
        # a stream cut after `event: error` is what the contract allows (an SSE error, then an aborted body)
        if req.kind == "stream" and a.status == 200 and b"event: error" in a.body:
            return "sse_event_error", a.error
        if a.error == "eof_mid_answer" and a.status is not None and req.kind != "stream":
            # the worker died after its answer began: the daemon closes the connection short of
            # Content-Length (DESIGN "an aborted body, never a silent truncation"): detectable, but incomplete
            return "aborted_body", a.error
        return "malformed", a.error
    if a.status != 200:
        try:
            err = json.loads(a.body)["error"]
            if err["type"] not in ERROR_TYPES:
                return "malformed", f"unknown error type {err['type']!r}"
        except (ValueError, KeyError, TypeError):
            return "malformed", f"status {a.status} without a JSON error body: {bytes(a.body[:120])!r}"
        return "typed_error", err["type"]
    if req.kind == "stream":
        body = bytes(a.body)
        idx = [int(i) for i in SSE_DATA.findall(body)]
        if body.endswith(b"data: [DONE]\n\n"):
            if idx != list(range(req.stream_n)):
                return "malformed", f"stream with [DONE] but events {idx[:5]}.. of {req.stream_n}"
            return "sse_done", None
        if b"event: error" in body:
            return "sse_event_error", "clean"
        return "malformed", f"stream ended with neither [DONE] nor event: error: {body[-80:]!r}"
    if req.kind in ("echo", "echo_retry"):
        try:
            e = json.loads(a.body)
        except ValueError:
            return "malformed", "echo answer is not JSON"
        if e.get("body_length") != len(req.body) or e.get("body_sha256") != hashlib.sha256(req.body).hexdigest():
            return "malformed", f"echo body mismatch: {e.get('body_length')} bytes vs {len(req.body)}"
    return "ok", None


# ---- metrics, status, chaos ---------------------------------------------------------------------------

LINE = re.compile(r'^(gpu_supervisor_\w+)\{([^}]*)\} (\S+)$')


def metric_sum(text: str, name: str, by: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m.group(1) == name:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[labels.get(by, "")] += float(m.group(3))
    return dict(out)


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    keys = set(after) | set(before)
    return {k: int(round(after.get(k, 0) - before.get(k, 0))) for k in sorted(keys)
            if round(after.get(k, 0) - before.get(k, 0))}


async def replicas(sp: SupervisorProcess, worker: str = WORKER) -> list[dict]:
    return (await sp.status())["workers"][worker]["replicas"]


async def all_serving(sp: SupervisorProcess, worker: str = WORKER) -> bool:
    reps = await replicas(sp, worker)
    return all(r["state"] in ("ready", "busy") for r in reps)


def daemon_usage(sp: SupervisorProcess) -> dict:
    assert sp.proc is not None
    p = psutil.Process(sp.proc.pid)
    return {"rss_bytes": p.memory_info().rss, "num_fds": p.num_fds(), "threads": p.num_threads()}


class Chaos:
    """Three fault loops on the serving replicas, each on its own period, until `stop` is set."""

    def __init__(self, sp: SupervisorProcess, args: argparse.Namespace, rng: random.Random):
        self.sp = sp
        self.args = args
        self.rng = rng
        self.stop = asyncio.Event()
        self.done = collections.Counter()
        self.oom_codes: collections.Counter[str] = collections.Counter()
        self.stopped: set[int] = set()
        self.killed: set[int] = set()
        self.t0 = time.monotonic()
        self.actions: list[tuple[float, str, int | None]] = []  # (s since start, action, pid)

    async def _pick(self, avoid_stopped: bool = False) -> int | None:
        reps = [r for r in await replicas(self.sp) if r["state"] in ("ready", "busy") and r["pid"]
                and r["pid"] not in self.killed]  # the daemon may not have seen our SIGKILL yet
        if avoid_stopped:
            reps = [r for r in reps if r["pid"] not in self.stopped]
        return self.rng.choice(reps)["pid"] if reps else None

    async def _every(self, period: float, what: str, act, phase: float = 0.0) -> None:
        if period <= 0:
            return
        nxt = time.monotonic() + period + phase
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), max(0.0, nxt - time.monotonic()))
                return
            except TimeoutError:
                pass
            if await act():
                self.done[what] += 1
            nxt += period

    async def _kill(self) -> bool:
        pid = await self._pick(avoid_stopped=True)  # a stopped replica is left for hang detection
        if pid:
            kill_quiet(pid, signal.SIGKILL)
            self.killed.add(pid)
            self.actions.append((round(time.monotonic() - self.t0, 3), "SIGKILL", pid))
        return pid is not None

    async def _sigstop(self) -> bool:
        pid = await self._pick(avoid_stopped=True)
        if pid:
            kill_quiet(pid, signal.SIGSTOP)
            self.stopped.add(pid)
            self.actions.append((round(time.monotonic() - self.t0, 3), "SIGSTOP", pid))
        return pid is not None

    async def _oom(self) -> bool:
        conn = Conn(self.sp.port)
        a = await conn.request("GET", "/die-oom", b"", f"oom-{self.done['oom_sent']}", 60)
        self.done["oom_sent"] += 1
        await conn.close()
        code = str(a.status) if a.error is None else f"error:{a.error}"
        self.oom_codes[code] += 1
        return a.error is None

    async def run(self) -> None:
        a = self.args
        # phases apart, so two faults never pick the same replica in the same instant
        await asyncio.gather(self._every(a.kill_every, "sigkill", self._kill),
                             self._every(a.stop_every, "sigstop", self._sigstop, a.kill_every / 2),
                             self._every(a.oom_every, "die_oom", self._oom, a.kill_every / 4))

    def release_stopped(self) -> None:
        """SIGCONT what we stopped and the daemon did not kill yet, so nothing stays frozen after the bench."""
        for pid in self.stopped:
            kill_quiet(pid, signal.SIGCONT)


async def load(sp: SupervisorProcess, reqs: list[Req], clients: int, timeout: float, tag: str) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    problems: list[dict] = []
    seen: dict[str, tuple[int | None, str, str | None]] = {}
    attempts: collections.Counter[str] = collections.Counter()
    it = iter(reqs)
    conns = [Conn(sp.port) for _ in range(clients)]

    async def client(conn: Conn) -> None:
        for req in it:
            rid = f"{tag}-{req.n}"
            a = await conn.request(req.method, req.target, req.body, rid, timeout)
            outcome, detail = judge(req, a)
            seen[rid] = (a.status, outcome, detail)
            outcomes[outcome] += 1
            key = {"typed_error": f"{a.status} {detail}", "sse_event_error": f"sse_event_error ({detail})"}
            by_kind[req.kind][key.get(outcome, outcome)] += 1
            if a.status is not None and outcome not in ("lost",):
                codes[str(a.status)] += 1
            if a.headers.get("x-supervisor-attempts"):
                attempts[a.headers["x-supervisor-attempts"]] += 1
            bad = outcome in ("lost", "malformed", "aborted_body") or (req.retry_safe and a.status != 200)
            if bad and len(problems) < 50:
                problems.append({"request_id": rid, "kind": req.kind, "target": req.target,
                                 "body_bytes": len(req.body), "retry_safe": req.retry_safe,
                                 "status": a.status, "outcome": outcome, "detail": detail,
                                 "body_head": bytes(a.body[:200]).decode("utf-8", "replace")})
            if req.retry_safe and a.status != 200:
                outcomes["retry_safe_not_200"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(client(c) for c in conns))
    elapsed = time.monotonic() - t0
    for c in conns:
        await c.close()
    return {"requests": len(reqs), "seconds": elapsed, "rps": len(reqs) / elapsed,
            "outcomes": dict(outcomes), "codes": dict(sorted(codes.items())),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
            "attempts_header": dict(sorted(attempts.items())),
            "connections_opened": sum(c.opened for c in conns), "problems": problems, "seen": seen}


async def main(args: argparse.Namespace) -> dict:
    cfg = policy(args)
    sp = SupervisorProcess(Path(tempfile.mkdtemp(prefix="gs-chaos-")), cfg)
    await sp.start(timeout=60)
    result: dict = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "log_file")}}
    try:
        await wait_until(lambda: all_serving(sp), 30, "every replica serving")
        # the daemon's own endpoints are not proxied requests: check they do not move requests_total
        m = await sp.metrics()
        await sp.status()
        assert metric_sum(await sp.metrics(), "gpu_supervisor_requests_total", "code") == \
            metric_sum(m, "gpu_supervisor_requests_total", "code"), "/status or /metrics counted as requests"

        rng = random.Random(args.seed)
        max_retry_body = 1_048_576
        # warm-up under the same chaos, so pools, caches and allocator arenas exist before the baseline
        if args.warmup:
            chaos = Chaos(sp, args, rng)
            ctask = asyncio.create_task(chaos.run())
            warm = await load(sp, make_requests(args.warmup, args.seed + 1, max_retry_body), args.clients,
                              args.timeout, "warm")
            chaos.stop.set()
            await ctask
            chaos.release_stopped()
            result["warmup"] = {k: warm[k] for k in ("requests", "seconds", "outcomes", "codes")}
            await wait_until(lambda: all_serving(sp), 60, "every replica serving after the warm-up")
            await asyncio.sleep(args.settle)
        before_use = daemon_usage(sp)
        m0 = await sp.metrics()
        log0 = len(sp.logs)

        chaos = Chaos(sp, args, rng)
        ctask = asyncio.create_task(chaos.run())
        t0 = time.monotonic()
        run = await load(sp, make_requests(args.requests, args.seed, max_retry_body), args.clients,
                         args.timeout, "req")
        chaos.stop.set()
        await ctask
        duration = time.monotonic() - t0
        chaos.release_stopped()

        await wait_until(lambda: all_serving(sp), 60, "every replica serving after the run")
        await asyncio.sleep(args.settle)
        after_use = daemon_usage(sp)
        m1 = await sp.metrics()

        daemon_codes = delta(metric_sum(m1, "gpu_supervisor_requests_total", "code"),
                             metric_sum(m0, "gpu_supervisor_requests_total", "code"))
        client_codes = collections.Counter(run["codes"])
        for code, n in chaos.oom_codes.items():
            if not code.startswith("error"):
                client_codes[code] += n
        result.update({
            "duration_s": duration,
            "run": run,
            "faults": dict(chaos.done),
            "die_oom_answers": dict(chaos.oom_codes),
            "client_codes_incl_die_oom": dict(sorted(client_codes.items())),
            "daemon_requests_total_by_code": daemon_codes,
            "restarts_by_reason": delta(metric_sum(m1, "gpu_supervisor_worker_restarts_total", "reason"),
                                        metric_sum(m0, "gpu_supervisor_worker_restarts_total", "reason")),
            "retries_by_reason": delta(metric_sum(m1, "gpu_supervisor_retries_total", "reason"),
                                       metric_sum(m0, "gpu_supervisor_retries_total", "reason")),
            "rejected_by_reason": delta(metric_sum(m1, "gpu_supervisor_rejected_total", "reason"),
                                        metric_sum(m0, "gpu_supervisor_rejected_total", "reason")),
            "daemon_before": before_use, "daemon_after": after_use,
            "daemon_alive": sp.proc is not None and sp.proc.returncode is None,
        })
        result["checks"] = {
            "lost_0": run["outcomes"].get("lost", 0) == 0,
            "malformed_0": run["outcomes"].get("malformed", 0) == 0,
            "aborted_0": run["outcomes"].get("aborted_body", 0) == 0,
            "retry_safe_all_200": run["outcomes"].get("retry_safe_not_200", 0) == 0,
            "metrics_match_clients": daemon_codes == {k: v for k, v in client_codes.items() if v},
            # kept-alive connections to the workers (at most one per slot) come and go with the replicas
            "fds_flat": after_use["num_fds"] - before_use["num_fds"] <= args.replicas * args.concurrency,
            "rss_flat": after_use["rss_bytes"] - before_use["rss_bytes"] <= args.rss_slack_mb * MIB,
        }
        seen = run.pop("seen")
        if args.access_log:  # which requests the daemon counted under another code than the client saw
            logged = {e["request_id"]: e["status"] for e in sp.events("request")}
            result["code_mismatches"] = [
                {"request_id": rid, "client": st, "daemon": logged.get(rid), "outcome": oc, "detail": dt}
                for rid, (st, oc, dt) in seen.items() if logged.get(rid) != st][:50]
        result["all_passed"] = all(result["checks"].values())
        logs = sp.logs[log0:]
        result["log_events"] = dict(collections.Counter(
            e["event"] for e in logs if e.get("event") in ("worker_hang", "poison_request", "worker_exited",
                                                           "stream_broken", "breaker_state", "request_retry")))
        exits = {e.get("worker_pid"): e for e in logs if e.get("event") == "worker_exited"}
        result["chaos_actions"] = chaos.actions
        result["sigstopped_exits"] = {str(pid): {k: exits[pid].get(k) for k in ("reason", "code", "signal")}
                                      if pid in exits else None for pid in chaos.stopped}
    finally:
        await sp.stop()
        if args.log_file:
            args.log_file.write_text("\n".join(sp.raw_lines) + "\n")
    return result


def report(res: dict) -> str:
    run = res["run"]
    o = run["outcomes"]
    b, a = res["daemon_before"], res["daemon_after"]
    lines = [
        f"{run['requests']} requests, {res['config']['clients']} clients, {res['config']['replicas']} replicas; "
        f"{res['duration_s']:.1f} s ({run['rps']:.0f} req/s)",
        f"faults: {res['faults']}  (die-oom answers: {res['die_oom_answers']})",
        "",
        f"{'code':<8}{'clients':>9}{'daemon':>9}",
    ]
    cc, dc = res["client_codes_incl_die_oom"], res["daemon_requests_total_by_code"]
    for code in sorted(set(cc) | set(dc)):
        lines.append(f"{code:<8}{cc.get(code, 0):>9}{dc.get(code, 0):>9}")
    lines += [
        "",
        f"outcomes: {o}",
        "per kind: " + "; ".join(f"{k}: {v}" for k, v in run["by_kind"].items()),
        f"X-Supervisor-Attempts: {run['attempts_header']}",
        f"restarts by reason: {res['restarts_by_reason']}",
        f"retries by reason: {res['retries_by_reason']}",
        f"rejected by reason: {res['rejected_by_reason']}",
        f"daemon fds {b['num_fds']} -> {a['num_fds']}, RSS {b['rss_bytes'] / MIB:.1f} -> "
        f"{a['rss_bytes'] / MIB:.1f} MiB ({(a['rss_bytes'] - b['rss_bytes']) / MIB:+.1f}), "
        f"threads {b['threads']} -> {a['threads']}; alive: {res['daemon_alive']}",
        f"log events: {res['log_events']}",
        "SIGSTOPped replicas' exit reasons: "
        f"{dict(collections.Counter(e['reason'] if e else 'not seen' for e in res['sigstopped_exits'].values()))}",
        "",
        "checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in res["checks"].items()),
    ]
    for m in res.get("code_mismatches", [])[:10]:
        lines.append(f"  code mismatch: {m}")
    for p in run["problems"][:10]:
        lines.append(f"  problem: {p}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests in the measured run (default 10000)")
    p.add_argument("--warmup", type=int, default=1000, help="requests under chaos before the baseline (default 1000)")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients, one connection each (default 32)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4, help="slots per replica (default 4)")
    p.add_argument("--max-attempts", type=int, default=5, help="retry.max_attempts (default 5)")
    p.add_argument("--stall-timeout", type=float, default=2.0, help="worker.stall_timeout_s (default 2)")
    p.add_argument("--breaker-min-calls", type=int, default=0, help="breaker.min_calls (0: the daemon default)")
    p.add_argument("--kill-every", type=float, default=1.0, help="seconds between SIGKILLs (0: off)")
    p.add_argument("--stop-every", type=float, default=5.0, help="seconds between SIGSTOPs (0: off)")
    p.add_argument("--oom-every", type=float, default=3.0, help="seconds between GET /die-oom (0: off)")
    p.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (a timeout is lost)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of rest before each fd/RSS reading")
    p.add_argument("--rss-slack-mb", type=float, default=5.0, help="RSS growth still called flat (default 5)")
    p.add_argument("--access-log", action="store_true",
                   help="daemon access log on: name each request whose counted code differs from the client's")
    p.add_argument("--log-file", type=Path, default=None, help="write the daemon's log lines here")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/chaos.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    res = asyncio.run(main(args))
    out = save_results(res, RESULTS / "chaos.json", args.out)
    print(report(res))
    print(f"\nwrote {out}")
    sys.exit(0 if res["all_passed"] else 1)
