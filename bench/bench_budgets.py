"""Client budgets: how close a tenant offered twice its budget gets to it, and what budgets cost per request.

  delivered   A real gpu-supervisor in front of tests/workers/usage_worker.py (its own tokenizer: the
              daemon's estimates are wrong, over for the answer and under for the prompt, as in life), one
              tenant with --tpm tokens per minute (count: total). Its bucket is drained first by a burst;
              then it is offered twice its budget for --duration seconds (open loop, evenly spaced
              requests). Delivered = the tokens of the answers' usage for the requests sent in the window;
              the budget = tpm x duration / 60. Target: within 5%.
  facade      The budget facade's own cost per request (charge with the estimate, the answer metered,
              settle) over the memory store, in this thread's CPU time over --facade-requests requests,
              the best of 7 rounds (the median beside it); then the same with --cold-mib MiB (16) of
              other memory touched before each request: cold caches, as between two requests of a
              loaded daemon that shares its core with the load and the worker.
  daemon      The daemon's CPU (utime + stime from /proc) per request over --cost-requests requests,
              budgets off (no `clients`) and on (a budget never reached): both daemons loaded at once by
              one client loop, so the machine's other load weighs on both alike; the median over --rounds
              of the difference is what budgets add. Target: under 10 us per request.

Prints a table and writes bench/results/budgets.json.

    .venv/bin/python bench/bench_budgets.py [--duration 60] [--tpm 12000] [--only delivered,facade,daemon]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.common import cpu_seconds, free_port, save_results, stop_all, wait_http  # noqa: E402

PY = sys.executable
USAGE_WORKER = REPO / "tests" / "workers" / "usage_worker.py"
RESULTS = REPO / "bench" / "results"
TENANT = "sk-tenant"
PROMPT = "x" * 400  # estimated 100 tokens; the worker counts 134
MAX_TOKENS = 100  # estimated 100; the worker stops at 50
USED_PER_REQUEST = -(-len(PROMPT) // 3) + -(-MAX_TOKENS // 2)  # the worker's own count: 184
DELIVERED_TOLERANCE = 0.05
COST_TARGET_US = 10.0
PARTS = ("delivered", "facade", "daemon")


def body() -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}


def policy(port: int, rundir: Path, clients: dict | None) -> dict:
    p = {
        "listen": {"host": "127.0.0.1", "port": port},
        "runtime_dir": str(rundir),
        "worker": {"command": [PY, str(USAGE_WORKER), "--socket", "{socket}"], "startup_timeout_s": 30},
        "queue": {"concurrency": 8, "max_size": 10_000, "fairness": {"key": "header:Authorization"}},
        "logging": {"format": "json", "level": "warning"},
    }
    if clients is not None:
        p["clients"] = clients
    return p


class Daemon:
    """One gpu-supervisor process with a policy, stopped on exit."""

    def __init__(self, clients: dict | None):
        self.tmp = Path(tempfile.mkdtemp(prefix="gs-budgets-"))
        self.port = free_port()
        self.cfg = self.tmp / "policy.yaml"
        self.cfg.write_text(json.dumps(policy(self.port, self.tmp / "run", clients)))  # JSON is YAML
        self.procs: list[subprocess.Popen] = []
        self.log = self.tmp / "supervisor.log"

    def __enter__(self) -> Daemon:
        with open(self.log, "w") as err:
            self.procs.append(subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(self.cfg)], cwd=REPO,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err))
        try:
            wait_http(f"{self.url}/readyz", timeout=60, proc=self.procs[0])
        except BaseException:
            print(self.log.read_text()[-3000:], file=sys.stderr)
            stop_all(self.procs, self.tmp)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_all(self.procs, self.tmp)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        """The daemon process's user + system CPU seconds so far."""
        return cpu_seconds(self.procs[0].pid)


# -- delivered ------------------------------------------------------------------------------------------
async def post(s: aiohttp.ClientSession, url: str) -> tuple[int, int]:
    """One request as the tenant: (status, tokens its answer says it used)."""
    async with s.post(f"{url}/v1/chat/completions", json=body(),
                      headers={"Authorization": f"Bearer {TENANT}"}) as r:
        data = await r.json()
        if r.status != 200:
            return r.status, 0
        return 200, data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]


async def offered_twice(url: str, tpm: int, duration: float) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        # drain the bucket: the window starts with (almost) nothing saved up
        drained = 0
        while (await post(s, url))[0] == 200:
            drained += 1
            if drained > 10 * tpm:
                raise RuntimeError("the budget never ran out: is it configured?")
        per_request = USED_PER_REQUEST
        rate = 2 * tpm / 60 / per_request  # requests per second offering twice the budget
        n = int(rate * duration)
        t0 = time.monotonic()
        tasks = []
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(post(s, url)))
        results = await asyncio.gather(*tasks)
    delivered = sum(t for _, t in results)
    budget = tpm * duration / 60
    return {"tpm": tpm, "duration_s": duration, "offered_requests": n, "offered_tokens": n * per_request,
            "answered": sum(1 for st, _ in results if st == 200),
            "rate_limited": sum(1 for st, _ in results if st == 429),
            "other": sum(1 for st, _ in results if st not in (200, 429)),
            "delivered_tokens": delivered, "budget_tokens": budget, "delivered_ratio": delivered / budget,
            "result": "PASS" if abs(delivered / budget - 1) <= DELIVERED_TOLERANCE else "FAIL"}


def delivered(args: argparse.Namespace) -> dict:
    clients = {"keys": {f"Bearer {TENANT}": {"name": "tenant", "tokens_per_minute": args.tpm}}}
    with Daemon(clients) as d:
        return asyncio.run(offered_twice(d.url, args.tpm, args.duration))


# -- the facade's cost ------------------------------------------------------------------------------------
def facade(n: int, cold_mib: int) -> dict:
    """charge + headers + meter + settle + usage record per request over the memory store, called as the
    request path calls them (the memory store never suspends: no coroutine), so only the facade's own
    work is timed. Then the same with `cold_mib` MiB of other memory touched before each request (one
    write per cache line, in both loops, so only the facade's extra is timed): a loaded daemon's other
    requests, the kernel and the processes sharing its core evict the caches between two requests."""
    from supervisor.budgets.core import Budgets
    from supervisor.budgets.usage import MemoryUsageStore, UsageLog
    from supervisor.config import parse
    from supervisor.fairness import hash_key
    from supervisor.http.call import Call
    from supervisor.metrics import Metrics

    s = parse("queue: {fairness: {key: 'header:Authorization'}}\n"
              "clients: {keys: {'Bearer t': {tokens_per_minute: 1000000000, requests_per_minute: 1000000000}}}")
    b = Budgets(s, Metrics())
    raw = json.dumps(body()).encode()
    answer = json.dumps({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "tok " * 50}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 134, "completion_tokens": 50, "total_tokens": 184}}).encode()
    key = hash_key("Bearer t")

    b.sink = UsageLog(MemoryUsageStore(), 3600.0)  # the usage log records each answer, as in the daemon

    def one() -> None:  # as the request path calls it: the memory store's calls need no coroutine
        c = Call("r", 0.0, "POST", "/v1/chat/completions", 0)
        c.client = key
        c.body = raw
        if b.charge_now(c, len(raw)) is not None:
            raise RuntimeError("the memory store suspended")
        h: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        c.charge.add_headers(h, [b"content-type"])  # (the lines it returns go on the answer)
        c.charge.answered(200, b"application/json", answer)
        if b.settle_now(c.charge) is not None:
            raise RuntimeError("the memory store suspended")

    def base() -> None:  # what the loop costs without the facade (the Call alone)
        c = Call("r", 0.0, "POST", "/v1/chat/completions", 0)
        c.client = key
        c.body = raw

    def timed(k: int, before=None) -> list[float]:
        rounds = []
        for _ in range(7):  # CPU time of this thread: a machine shared with others does not count against it
            t = time.thread_time()
            for _ in range(k):
                if before is not None:
                    before()
                one()
            t1 = time.thread_time()
            for _ in range(k):
                if before is not None:
                    before()
                base()
            t2 = time.thread_time()
            rounds.append(((t1 - t) - (t2 - t1)) / k * 1e6)
        return rounds

    for _ in range(1000):
        one()
    rounds = timed(n)
    us = min(rounds)
    other = bytearray(cold_mib << 20)
    lines = b"\x01" * (len(other) // 64)

    def evict() -> None:
        other[::64] = lines

    cold = timed(max(200, n // 20), evict)
    return {"requests": n, "us_per_request": us, "median_us": statistics.median(rounds), "rounds_us": rounds,
            "cold_mib": cold_mib, "cold_median_us": statistics.median(cold), "cold_rounds_us": cold,
            "result": "PASS" if us < COST_TARGET_US else "FAIL"}


# -- the daemon's cost ------------------------------------------------------------------------------------
async def load(url: str, n: int, concurrency: int) -> int:
    left = n
    ok = 0

    async def conn(s: aiohttp.ClientSession) -> None:
        nonlocal left, ok
        while left > 0:
            left -= 1
            async with s.post(f"{url}/v1/chat/completions", json=body(),
                              headers={"Authorization": f"Bearer {TENANT}"}) as r:
                await r.read()
                ok += r.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(conn(s) for _ in range(concurrency)))
    return ok


def daemon_cost(n: int, rounds: int, concurrency: int) -> dict:
    """Both daemons loaded at once by the same client loop (each `concurrency` connections, `n` requests a
    round), so what the machine does beside them (the client, the workers, anything else) weighs on both
    alike; the difference of their CPU over a round is what budgets add."""
    unlimited = {"keys": {f"Bearer {TENANT}": {"name": "tenant", "tokens_per_minute": 10**9,
                                                "requests_per_minute": 10**9}}}
    per: dict[str, list[float]] = {"off": [], "on": []}
    added: list[float] = []

    async def both(off: Daemon, on: Daemon, k: int) -> tuple[int, int]:
        return tuple(await asyncio.gather(load(off.url, k, concurrency), load(on.url, k, concurrency)))

    with Daemon(None) as off, Daemon(unlimited) as on:
        asyncio.run(both(off, on, 500))  # warm: connections, caches
        for _ in range(rounds):
            c0 = off.cpu_s(), on.cpu_s()
            oks = asyncio.run(both(off, on, n))
            c1 = off.cpu_s(), on.cpu_s()
            for mode, ok in zip(("off", "on"), oks):
                if ok != n:
                    raise RuntimeError(f"budgets {mode}: {n - ok} of {n} requests failed")
            per["off"].append((c1[0] - c0[0]) / n * 1e6)
            per["on"].append((c1[1] - c0[1]) / n * 1e6)
            added.append(per["on"][-1] - per["off"][-1])
    off_us, on_us, add_us = statistics.median(per["off"]), statistics.median(per["on"]), statistics.median(added)
    return {"requests_per_round": n, "rounds": rounds, "concurrency": concurrency,
            "cpu_us_per_request_off": off_us, "cpu_us_per_request_on": on_us, "added_us": add_us,
            "rounds_us": per, "added_rounds_us": added, "result": "PASS" if add_us < COST_TARGET_US else "FAIL"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds the tenant is offered twice its budget")
    ap.add_argument("--tpm", type=int, default=12000, help="the tenant's tokens per minute")
    ap.add_argument("--facade-requests", type=int, default=20000)
    ap.add_argument("--cold-mib", type=int, default=16,
                    help="MiB of other memory the facade's cold-cache run touches before each request")
    ap.add_argument("--cost-requests", type=int, default=6000, help="requests per round of the daemon part")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated, of " + ",".join(PARTS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    parts = [p for p in args.only.split(",") if p]
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--only: a comma-separated list of {', '.join(PARTS)}")
    res: dict = {"workload": {"prompt_chars": len(PROMPT), "max_tokens": MAX_TOKENS,
                              "worker": "tests/workers/usage_worker.py (3 chars a token, stops at max_tokens/2)"}}
    if "delivered" in parts:
        print("== delivered ==", flush=True)
        r = res["delivered"] = delivered(args)
        print(f"offered {r['offered_tokens']} tokens in {r['duration_s']:.0f}s against a budget of "
              f"{r['budget_tokens']:.0f}: delivered {r['delivered_tokens']} ({r['delivered_ratio']:.3f}x), "
              f"{r['answered']} answered, {r['rate_limited']} rate_limited, {r['other']} other  {r['result']}")
    if "facade" in parts:
        print("== facade ==", flush=True)
        r = res["facade"] = facade(args.facade_requests, args.cold_mib)
        print(f"charge + meter + settle: {r['us_per_request']:.2f} us per request (best of 7 rounds; median "
              f"{r['median_us']:.2f})  {r['result']}")
        print(f"the same with {r['cold_mib']} MiB of other memory touched before each request (cold caches, as in "
              f"a loaded daemon): {r['cold_median_us']:.2f} us per request (median of 7 rounds)")
    if "daemon" in parts:
        print("== daemon ==", flush=True)
        r = res["daemon"] = daemon_cost(args.cost_requests, args.rounds, args.concurrency)
        print(f"daemon CPU per request: off {r['cpu_us_per_request_off']:.1f} us, on "
              f"{r['cpu_us_per_request_on']:.1f} us, added {r['added_us']:.1f} us  {r['result']}")
    out = save_results(res, RESULTS / "budgets.json", args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
