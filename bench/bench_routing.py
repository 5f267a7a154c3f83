"""Replica choice: a multi-turn chat over 4 replicas of a prefix-caching engine, routed by least in flight, by
session and by prefix.

Runs a real gpu-supervisor with one worker `chat` of --replicas (4) replicas of tests/workers/fake_engine.py
(a fake engine that caches prompt prefixes in blocks as vLLM does and serves a request in base + per uncached
token time), once per mode of `routing.affinity` (none, session, prefix; prefix also reads the engines'
`load_signals` with the vllm preset). The workload: --conversations (64) conversations of --turns (8) turns,
each with its own system prompt of 1-2 KB and a history that grows by the user's message (80-300 bytes) and a
fixed assistant reply (420 bytes) per turn; --concurrency (16) requests in flight, conversations interleaved,
each conversation's turns in order, its id in `X-Session-ID`.

Per mode: p50/p99 latency, the cached share of prompt tokens (from the answers' usage), requests per replica
(`X-Supervisor-Replica`, else the engine's `X-Engine-Id` pid) and the max/min ratio of those. Targets:
prefix p50 <= 0.6x none's, prefix cached share >= 2x none's, no replica over 2.5x another (prefix).
When the daemon refuses the `routing` / `load_signals` keys, only `none` runs (without them), and it says so.

    .venv/bin/python bench/bench_routing.py [--conversations 64] [--turns 8] [--concurrency 16]

Prints a table and writes bench/results/routing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.common import free_port, pct, save_results, stop_all, wait_http  # noqa: E402

PY = sys.executable
FAKE_ENGINE = REPO / "tests" / "workers" / "fake_engine.py"
RESULTS = REPO / "bench" / "results"
WORKER = "chat"
MODEL = "fake-chat"
MODES = ("none", "session", "prefix")
SESSION_HEADER = "X-Session-ID"
# a reply of ~400 bytes (~100 tokens), as a short chat answer: the history grows by it every turn
ASSISTANT_REPLY = ("Understood. I have read the details above and I will keep them in mind for the rest of this "
                   "conversation. In short: the plan you describe is sound, the main risk is the order of the "
                   "steps, and the numbers you gave are consistent with each other. I would start with the "
                   "smallest change that can be measured, check it against the baseline, and only then go on "
                   "to the next one. Ask the next question whenever you are ready.")
# the targets
P50_RATIO_MAX = 0.6  # prefix p50 over none's p50
CACHED_RATIO_MIN = 2.0  # prefix cached share over none's
BALANCE_MAX = 2.5  # the busiest replica over the idlest


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One client's chat: its session id, its system prompt and the user's message of each turn."""

    session: str
    system: str
    users: tuple[str, ...]


def words(rng: random.Random, vocabulary: list[str], size: int) -> str:
    """Words from the vocabulary until the text is `size` bytes long (ASCII)."""
    out: list[str] = []
    n = 0
    while n < size:
        w = rng.choice(vocabulary)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:size]


def workload(conversations: int, turns: int, seed: int) -> list[Conversation]:
    """The same conversations for every mode: system prompts of 1-2 KB, user messages of 80-300 bytes."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10))) for _ in range(500)]
    out = []
    for c in range(conversations):
        system = f"You are assistant {c}. " + words(rng, vocabulary, rng.randint(1024, 2048))
        users = tuple(f"Question {t}: " + words(rng, vocabulary, rng.randint(80, 300)) for t in range(turns))
        out.append(Conversation(f"conv-{c}", system, users))
    return out


def policy(mode: str, port: int, rundir: Path, args: argparse.Namespace, with_routing: bool) -> dict:
    """One worker `chat` of fake engines; `routing.affinity: <mode>` (and the vllm load signals for prefix)."""
    chat: dict = {
        "command": [PY, str(FAKE_ENGINE), "--socket", "{socket}", "--model", MODEL],
        "replicas": args.replicas,
        "concurrency": args.slots,
        "startup_timeout_s": 30,
        "stop_grace_s": 2,
        "health": {"path": "/health", "interval_s": 1, "timeout_s": 2, "failures": 3},
    }
    if with_routing:
        chat["routing"] = {"affinity": mode, "session_header": SESSION_HEADER}
        if mode == "prefix":
            chat["load_signals"] = {"preset": "vllm"}
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "runtime_dir": str(rundir),
        "workers": {WORKER: chat},
        "queue": {"max_size": 10_000, "timeout_s": 60},
        "logging": {"format": "json", "level": "warning"},
    }


def refused(path: Path) -> str | None:
    """The daemon's problems with a policy file (check-config), or None when it accepts it."""
    r = subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    return None if r.returncode == 0 else (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}")


async def wait_replicas(session: aiohttp.ClientSession, base: str, n: int, timeout: float = 60.0) -> None:
    """Until `n` replicas of the worker serve (/status), so that none starts the run cold or absent."""
    deadline = time.monotonic() + timeout
    while True:
        async with session.get(f"{base}/status") as r:
            reps = (await r.json())["workers"][WORKER]["replicas"]
        if sum(1 for rep in reps if rep["state"] in ("ready", "busy")) >= n:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} replicas not serving within {timeout}s: {[r['state'] for r in reps]}")
        await asyncio.sleep(0.1)


@dataclasses.dataclass
class Tally:
    """What the answers of one mode said."""

    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    per_replica: Counter[str] = dataclasses.field(default_factory=Counter)
    by_header: str = "X-Supervisor-Replica"
    errors: Counter[str] = dataclasses.field(default_factory=Counter)


async def converse(session: aiohttp.ClientSession, url: str, conv: Conversation, slots: asyncio.Semaphore,
                   tally: Tally) -> None:
    """One conversation's turns in order, each holding one of the in-flight slots while it is answered."""
    messages = [{"role": "system", "content": conv.system}]
    for user in conv.users:
        messages.append({"role": "user", "content": user})
        body = {"model": MODEL, "messages": messages, "max_tokens": 8}
        answer, replica, engine = None, None, "?"
        async with slots:
            t0 = time.monotonic()
            try:
                async with session.post(url, json=body, headers={SESSION_HEADER: conv.session}) as r:
                    if r.status == 200:
                        answer = await r.json()
                        replica = r.headers.get("X-Supervisor-Replica")
                        engine = r.headers.get("X-Engine-Id", "?")
                    else:
                        tally.errors[f"status {r.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.errors[type(exc).__name__] += 1
            ms = (time.monotonic() - t0) * 1000
        if answer is not None:
            tally.latencies_ms.append(ms)
            usage = answer["usage"]
            tally.prompt_tokens += usage["prompt_tokens"]
            tally.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            if replica is None:
                tally.by_header = "X-Engine-Id"
            tally.per_replica[replica or f"pid {engine}"] += 1
        messages.append({"role": "assistant", "content": ASSISTANT_REPLY})


def routing_decisions(metrics: str) -> dict[str, float]:
    """routing_decisions_total of the worker by decision, from the daemon's Prometheus text."""
    out: dict[str, float] = {}
    for m in re.finditer(r'^\w*routing_decisions_total\{([^}]*)\} (\S+)$', metrics, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("worker") == WORKER:
            out[labels.get("decision", "?")] = float(m.group(2))
    return out


async def run_mode(port: int, convs: list[Conversation], args: argparse.Namespace) -> dict:
    """The whole workload against a daemon that is up; the tally of its answers as a result row."""
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
        await wait_replicas(session, base, args.replicas)
        slots = asyncio.Semaphore(args.concurrency)
        url = f"{base}/v1/chat/completions"
        t0 = time.monotonic()
        async with asyncio.timeout(args.max_seconds):
            async with asyncio.TaskGroup() as tg:
                for conv in convs:
                    tg.create_task(converse(session, url, conv, slots, tally))
        wall = time.monotonic() - t0
        async with session.get(f"{base}/metrics") as r:
            decisions = routing_decisions(await r.text())
    counts = dict(sorted(tally.per_replica.items()))
    if tally.by_header == "X-Supervisor-Replica":  # a replica that got nothing counts as 0
        counts = {f"{WORKER}/{i}": 0 for i in range(args.replicas)} | counts
    low, high = min(counts.values(), default=0), max(counts.values(), default=0)
    return {
        "requests": len(tally.latencies_ms),
        "errors": dict(tally.errors),
        "wall_s": round(wall, 3),
        "rps": round(len(tally.latencies_ms) / wall, 1) if wall > 0 else None,
        "p50_ms": pct(tally.latencies_ms, 50),
        "p99_ms": pct(tally.latencies_ms, 99),
        "prompt_tokens": tally.prompt_tokens,
        "cached_tokens": tally.cached_tokens,
        "cached_share": tally.cached_tokens / tally.prompt_tokens if tally.prompt_tokens else 0.0,
        "replica_by": tally.by_header,
        "per_replica": counts,
        "max_min_ratio": high / low if low else None,  # None: a replica served nothing
        "routing_decisions": decisions,
    }


def measure(mode: str, convs: list[Conversation], args: argparse.Namespace) -> dict:
    """Start a daemon for `mode`, run the workload through it, stop it. A refused policy is a skipped mode
    (for `none`, it runs without the routing keys)."""
    tmp = Path(tempfile.mkdtemp(prefix="gs-routing-"))
    procs: list[subprocess.Popen] = []
    try:
        port = free_port()
        cfg = tmp / "policy.yaml"
        cfg.write_text(json.dumps(policy(mode, port, tmp / "run", args, with_routing=True)))  # JSON is YAML
        problems = refused(cfg)
        note = None
        if problems is not None:
            if mode != "none":
                return {"skipped": f"the daemon refuses the policy: {problems}"}
            note = f"routing keys refused, ran without them: {problems}"
            cfg.write_text(json.dumps(policy(mode, port, tmp / "run", args, with_routing=False)))
        log = tmp / "supervisor.log"
        with open(log, "w") as err:
            procs.append(subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(cfg)], cwd=REPO,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err))
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, proc=procs[0])
            row = asyncio.run(run_mode(port, convs, args))
        except BaseException:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        if note:
            row["note"] = note
        return row
    finally:
        stop_all(procs, tmp)


def verdicts(modes: dict[str, dict]) -> dict[str, dict]:
    """The issue's three targets, each with its measured value and PASS / FAIL (or SKIP without its modes)."""
    none, prefix = modes.get("none", {}), modes.get("prefix", {})
    if "p50_ms" not in none or "p50_ms" not in prefix:
        return {name: {"result": "SKIP"} for name in ("prefix_p50", "prefix_cached_share", "prefix_balance")}
    p50 = prefix["p50_ms"] / none["p50_ms"]
    cached = prefix["cached_share"] / none["cached_share"] if none["cached_share"] else float("inf")
    balance = prefix["max_min_ratio"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    return {
        "prefix_p50": {"target": f"<= {P50_RATIO_MAX}x none", "ratio": p50, "result": verdict(p50 <= P50_RATIO_MAX)},
        "prefix_cached_share": {"target": f">= {CACHED_RATIO_MIN}x none",
                                "ratio": cached if cached != float("inf") else None,
                                "result": verdict(cached >= CACHED_RATIO_MIN)},
        "prefix_balance": {"target": f"max/min <= {BALANCE_MAX}", "ratio": balance,
                           "result": verdict(balance is not None and balance <= BALANCE_MAX)},
    }


def print_table(modes: dict[str, dict]) -> None:
    print(f"\n{'mode':9s}{'requests':>9s}{'errors':>7s}{'p50 ms':>9s}{'p99 ms':>9s}{'cached':>8s}{'max/min':>9s}"
          "  per replica")
    for mode, r in modes.items():
        if "skipped" in r:
            print(f"{mode:9s}skipped: {r['skipped']}")
            continue
        ratio = f"{r['max_min_ratio']:.2f}" if r["max_min_ratio"] is not None else "inf"
        per = " ".join(f"{k}={v}" for k, v in r["per_replica"].items())
        print(f"{mode:9s}{r['requests']:>9d}{sum(r['errors'].values()):>7d}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
              f"{r['cached_share']:>8.1%}{ratio:>9s}  {per}")
        if r.get("note"):
            print(f"{'':9s}note: {r['note']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=64)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--slots", type=int, default=8, help="the worker's concurrency: slots per replica")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of none,session,prefix")
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--request-timeout", type=float, default=60.0, help="seconds for one request")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="bound of one mode's run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    wanted = [m for m in args.modes.split(",") if m]
    if not wanted or any(m not in MODES for m in wanted):
        ap.error(f"--modes: a comma-separated list of {', '.join(MODES)}")
    convs = workload(args.conversations, args.turns, args.seed)
    modes: dict[str, dict] = {}
    for mode in wanted:
        print(f"== {mode} ==", flush=True)
        modes[mode] = measure(mode, convs, args)
        if "skipped" in modes[mode]:
            print(f"{mode}: skipped, {modes[mode]['skipped']}", flush=True)
    print_table(modes)
    targets = verdicts(modes)
    print()
    for name, v in targets.items():
        ratio = f"{v['ratio']:.2f}" if v.get("ratio") is not None else "n/a"
        print(f"{name:20s} {v['result']:5s} {ratio:>6s}  (target {v.get('target', '-')})")
    res = {"workload": {"conversations": args.conversations, "turns": args.turns, "concurrency": args.concurrency,
                        "replicas": args.replicas, "slots_per_replica": args.slots, "seed": args.seed,
                        "system_prompt_bytes": [1024, 2048], "user_bytes": [80, 300],
                        "assistant_reply_bytes": len(ASSISTANT_REPLY),
                        "engine": "tests/workers/fake_engine.py with its defaults"},
           "modes": modes, "targets": targets}
    out = save_results(res, RESULTS / "routing.json", args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
