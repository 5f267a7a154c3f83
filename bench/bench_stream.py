"""Streaming (SSE) through the proxies: many long event streams, direct, through nginx and through gpu-supervisor.

One trivial upstream (bench/trivial_upstream.py, its `GET /sse?n=..&rate=..&size=..`) serves every front:
gpu-supervisor spawns it as its worker (the policy shape of bench_proxy.py, `queue.concurrency` at least the
number of streams, no deadline) and nginx (bench/common.py's nginx_conf, proxy_buffering off) proxies to the
same Unix socket; `direct` is the upstream's own TCP port. Without gpu-supervisor in --only the upstream is
started on its own.

Per scenario (streams x events/s each, every stream lasting --seconds, so n = rate x seconds events) and per
front in turn, a load generator (--procs processes, each one uvloop loop of raw asyncio Protocols) opens all
its streams at once, sends each GET, and decodes just enough of each answer to count events ("\\n\\n" in the
chunked body, across chunk and read boundaries) and to see the [DONE] event and the last chunk. Reported per
front: events/s delivered (events over first GET to last event), streams complete / total, lost events
(expected - received), the gap between consecutive events of a stream (p50/p99; events that arrive in one
read are 0 apart), time to first event (p50/p99, from the GET written), the CPU seconds of the front's own
process (nginx's worker; the supervisor daemon, without its worker) and of the upstream and the load
generator, and events/s against nginx's. The issue's targets: 256 x 100/s >= 0.98x nginx, 512 x 200/s
>= 0.95x nginx (PASS/FAIL printed). A stream not done within 4 x seconds + 10 s is cut and counted as lost.

--tree PATH runs the supervisor of another source tree (its `supervisor/` package, cwd PATH, the same python),
for a before/after comparison by the same script; the upstream is always this tree's.

    python bench/bench_stream.py [--streams 256 --rate 100] [--seconds 10] [--procs 1] [--only nginx,gpu-supervisor]
                                 [--tree PATH] [--upstream raw|aiohttp]

Prints a table per scenario and writes bench/results/stream.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.common import free_port, nginx_conf, save_results, stop_all, wait_http  # noqa: E402

FRONTS = ("direct", "nginx", "gpu-supervisor")
# the scenarios (streams, events/s per stream) and its targets: events/s against nginx's
SCENARIOS = ((256, 100.0), (512, 200.0))
TARGETS = {(256, 100.0): 0.98, (512, 200.0): 0.95}
DONE_TAIL = b"data: [DONE]\n\n"
MAX_HEAD = 65536
MIB = 1 << 20


# ---- the fronts: shared with bench_slow.py ---------------------------------------------------------------

def find_nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def supervisor_policy(port: int, rundir: Path, direct_port: int | None, upstream: str, concurrency: int) -> dict:
    """bench_proxy.py's policy: the trivial upstream as the one worker, `concurrency` slots, nothing else set."""
    command = [PY, str(HERE / "trivial_upstream.py"), "--socket", "{socket}", "--impl", upstream]
    if direct_port is not None:
        command += ["--port", str(direct_port)]
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "runtime_dir": str(rundir),
        "worker": {"command": command, "health": {"interval_s": 5, "timeout_s": 2, "failures": 3}},
        "queue": {"concurrency": concurrency, "max_size": 10000},
        "logging": {"format": "json", "level": "warning"},
    }


def check_tree(tree: Path) -> None:
    if not (tree / "supervisor" / "__main__.py").is_file():
        raise SystemExit(f"--tree {tree}: no supervisor/ package there")


def start_supervisor(tmp: Path, policy: dict, tree: Path, procs: list[subprocess.Popen]) -> tuple[subprocess.Popen,
                                                                                                    Path]:
    """`python -m supervisor run` from `tree` (cwd), as bench_proxy.py starts it; ready, and its worker's socket."""
    (tmp / "policy.yaml").write_text(json.dumps(policy))
    sup = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(tmp / "policy.yaml")], cwd=tree,
                           stdout=subprocess.DEVNULL, stderr=open(tmp / "supervisor.log", "w"))
    procs.append(sup)
    wait_http(f"http://127.0.0.1:{policy['listen']['port']}/readyz", proc=sup)
    # the worker's socket is named <worker>-<replica>-<generation>.sock: the one in the runtime dir
    return sup, next(Path(policy["runtime_dir"]).glob("*.sock"))


def start_upstream(tmp: Path, port: int | None, upstream: str, procs: list[subprocess.Popen]) -> tuple[
        subprocess.Popen, Path]:
    """The trivial upstream on its own (no supervisor): a Unix socket in `tmp`, and `port` if given."""
    sock = tmp / "upstream.sock"
    cmd = [PY, str(HERE / "trivial_upstream.py"), "--socket", str(sock), "--impl", upstream]
    if port is not None:
        cmd += ["--port", str(port)]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "upstream.log", "w"))
    procs.append(p)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the upstream did not start: {(tmp / 'upstream.log').read_text()[-2000:]}")
        time.sleep(0.05)
    if port is not None:
        wait_http(f"http://127.0.0.1:{port}/hello", proc=p)
    return p, sock


def start_nginx(tmp: Path, sock: Path, port: int, procs: list[subprocess.Popen]) -> psutil.Process:
    """nginx (one worker) on 127.0.0.1:port in front of `sock`; returns its worker process."""
    nginx = find_nginx()
    if nginx is None:
        raise SystemExit("nginx is needed (apt-get install nginx)")
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, sock, port))
    ng = subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(ng)
    wait_http(f"http://127.0.0.1:{port}/hello", proc=ng)
    workers = psutil.Process(ng.pid).children()
    if len(workers) != 1:
        raise RuntimeError(f"nginx: expected one worker process, found {len(workers)}")
    return workers[0]


def upstream_of(sup: subprocess.Popen) -> psutil.Process:
    """The supervisor's worker: its child running trivial_upstream.py."""
    for c in psutil.Process(sup.pid).children(recursive=True):
        if any("trivial_upstream.py" in a for a in c.cmdline()):
            return c
    raise RuntimeError("the supervisor's worker (trivial_upstream.py) is not among its children")


def cpu_s(p: psutil.Process | None) -> float:
    """User + system CPU seconds of one process (not its children); 0 for none."""
    if p is None:
        return 0.0
    t = p.cpu_times()
    return t.user + t.system


# ---- the load generator ------------------------------------------------------------------------------------

class SseStream(asyncio.Protocol):
    """One stream: sends its GET, finds the head's end, then decodes the chunked body just enough to count
    events ("\\n\\n" in the payload, across chunk and read boundaries) and see [DONE] and the last chunk."""

    __slots__ = ("gen", "request", "transport", "head", "in_body", "status", "left", "skip", "line", "last", "nl",
                 "tail", "events", "done", "complete", "error", "sent_at", "first_s", "last_event", "ended")

    def __init__(self, gen: LoadGen, request: bytes):
        self.gen = gen
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.head = b""  # the answer's head until its end came
        self.in_body = False
        self.status = 0
        self.left = 0  # bytes of the current chunk's data still to come
        self.skip = 0  # bytes of the CRLF after a chunk still to come
        self.line = b""  # a chunk-size line split between reads
        self.last = False  # the last chunk's size line came: its CRLF ends the body
        self.nl = False  # the payload so far ends with "\n"
        self.tail = b""  # the payload's last bytes: does it end with [DONE]?
        self.events = 0  # data events, [DONE] not counted
        self.done = False  # the [DONE] event came
        self.complete = False  # the last chunk came
        self.error: str | None = None
        self.sent_at = 0.0
        self.first_s: float | None = None
        self.last_event = 0.0
        self.ended: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]
        self.sent_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                if len(self.head) > MAX_HEAD:
                    self.end("head too large")
                return
            head, data = self.head[:i], self.head[i + 4:]
            self.head = b""
            self.in_body = True
            try:
                self.status = int(head[9:12])
            except ValueError:
                self.end("bad status line")
                return
            if self.status != 200:
                self.end(f"status {self.status}")
                return
            if b"\r\ntransfer-encoding: chunked" not in head.lower():
                self.end("not chunked")
                return
            if not data:
                return
        try:
            new = self.decode(data)
        except ValueError:
            self.end("bad chunk framing")
            return
        if new:
            if not self.done and self.tail.endswith(DONE_TAIL):  # this read brought [DONE]'s end
                self.done = True
                new -= 1
            if new:
                self.gen.add_events(self, new, time.monotonic())
        if self.complete:
            self.end(None if self.done else "no [DONE]")

    def decode(self, data: bytes) -> int:
        """Walk the chunked framing of `data`; returns the "\\n\\n" seen in the payload."""
        count, pos, n = 0, 0, len(data)
        while pos < n:
            if self.left:
                end = min(n, pos + self.left)
                p = data[pos:end]  # data itself when the read is one chunk's data
                self.left -= end - pos
                pos = end
                count += p.count(b"\n\n")
                if self.nl and p[0] == 10:
                    count += 1
                self.nl = p[-1] == 10
                self.tail = p[-15:] if len(p) >= 15 else (self.tail + p)[-15:]
                if not self.left:
                    self.skip = 2
            elif self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
                if not self.skip and self.last:
                    self.complete = True
                    return count
            else:
                if self.line:  # a size line split between reads
                    data, pos, self.line = self.line + data[pos:], 0, b""
                    n = len(data)
                j = data.find(b"\r\n", pos)
                if j < 0:
                    self.line = data[pos:]
                    if len(self.line) > 1024:
                        raise ValueError("chunk size line too long")
                    break
                size = int(data[pos:j].split(b";", 1)[0], 16)
                pos = j + 2
                if size:
                    self.left = size
                else:
                    self.last = True
                    self.skip = 2  # no trailers are sent
        return count

    def end(self, error: str | None) -> None:
        """The stream is over, cleanly (None) or not: recorded, its connection closed."""
        if self.ended is not None:
            return
        self.error = error
        self.ended = time.monotonic()
        if self.transport is not None:
            self.transport.close()
        self.gen.stream_ended()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended is None:
            self.end(f"closed: {exc}" if exc else "closed by the front")

    def record(self) -> tuple:
        return (self.status, self.events, self.done, self.complete, self.error, self.first_s)


class LoadGen:
    """One process's streams: their event counts, the gaps between events, and when all ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int):
        self.loop = loop
        self.open = count
        self.all_ended = loop.create_future()
        self.gaps = array("d")  # gaps between consecutive events of a stream, when > 0 (a new read)
        self.zero_gaps = 0  # events that came in the same read as the one before them
        self.last_event = 0.0

    def add_events(self, s: SseStream, k: int, now: float) -> None:
        if s.events:
            self.gaps.append(now - s.last_event)
        else:
            s.first_s = now - s.sent_at
        self.zero_gaps += k - 1
        s.events += k
        s.last_event = now
        self.last_event = now

    def stream_ended(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.all_ended.done():
            self.all_ended.set_result(None)


async def run_streams(host: str, port: int, target: str, count: int, bound_s: float) -> dict:
    """Open `count` streams to host:port at once, each `GET target`; wait until all end or `bound_s` passed."""
    loop = asyncio.get_running_loop()
    gen = LoadGen(loop, count)
    request = (f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n").encode()
    streams = [SseStream(gen, request) for _ in range(count)]
    t0 = time.monotonic()

    async def open_one(s: SseStream) -> None:
        try:
            await loop.create_connection(lambda: s, host, port)
        except OSError as exc:
            s.end(f"connect: {exc.strerror or exc}")

    await asyncio.gather(*(open_one(s) for s in streams))
    if count:
        try:
            await asyncio.wait_for(asyncio.shield(gen.all_ended), max(0.0, t0 + bound_s - time.monotonic()))
        except TimeoutError:
            pass
    for s in streams:
        if s.ended is None:
            s.end("cut: not done within the bound")
            if s.transport is not None:
                s.transport.abort()
    await asyncio.sleep(0)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"t0": t0, "last_event": gen.last_event, "records": [s.record() for s in streams], "gaps": gen.gaps,
            "zero_gaps": gen.zero_gaps, "cpu_s": ru.ru_utime + ru.ru_stime}


def _loadgen_main(job: dict) -> dict:
    import uvloop
    return uvloop.run(run_streams(**job))


def load(port: int, target: str, streams: int, procs: int, bound_s: float) -> dict:
    """The streams split over `procs` load generator processes (forked); their results merged."""
    shares = [streams // procs + (1 if i < streams % procs else 0) for i in range(procs)]
    jobs = [{"host": "127.0.0.1", "port": port, "target": target, "count": c, "bound_s": bound_s}
            for c in shares if c]
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        parts = pool.map(_loadgen_main, jobs)
    gaps = array("d")
    for p in parts:
        gaps.extend(p["gaps"])
    return {"t0": min(p["t0"] for p in parts), "last_event": max(p["last_event"] for p in parts),
            "records": [r for p in parts for r in p["records"]], "gaps": gaps,
            "zero_gaps": sum(p["zero_gaps"] for p in parts), "cpu_s": sum(p["cpu_s"] for p in parts)}


def pct_zeros(values: list[float], zeros: int, p: float) -> float:
    """The p-th percentile (interpolated) of `values` (sorted) together with `zeros` zeros; NaN for no data."""
    total = zeros + len(values)
    if not total:
        return float("nan")
    k = (total - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, total - 1)

    def at(i: int) -> float:
        return 0.0 if i < zeros else values[i - zeros]

    return at(lo) + (at(hi) - at(lo)) * (k - lo)


# ---- one scenario ------------------------------------------------------------------------------------------

@dataclass
class Front:
    name: str
    port: int
    proc: psutil.Process | None  # the front's own process (None: direct)


def probe(port: int) -> None:
    """One short stream through the front: 200, three events, [DONE]."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sse?n=3&rate=1000&size=8", timeout=30) as r:
        body = r.read()
    if r.status != 200 or body.count(b"\n\n") != 4 or not body.endswith(DONE_TAIL):
        raise RuntimeError(f"port {port}: /sse probe got {r.status} {body[:300]!r}")


def measure(front: Front, upstream: psutil.Process, streams: int, rate: float, seconds: float, procs: int,
            size: int) -> dict:
    """One front, one scenario: the load, and what it cost the front, the upstream and the load generator."""
    n = round(rate * seconds)
    target = f"/sse?n={n}&rate={rate:g}&size={size}"
    bound_s = 4 * seconds + 10
    probe(front.port)
    cpu0, up0 = cpu_s(front.proc), cpu_s(upstream)
    t = time.monotonic()
    r = load(front.port, target, streams, procs, bound_s)
    wall = time.monotonic() - t
    cpu1, up1 = cpu_s(front.proc), cpu_s(upstream)
    recs = r["records"]
    received = sum(x[1] for x in recs)
    expected = streams * n
    window = r["last_event"] - r["t0"] if received else float("nan")
    gaps, zeros = sorted(r["gaps"]), r["zero_gaps"]
    firsts = sorted(x[5] for x in recs if x[5] is not None)
    errors = Counter(x[4] for x in recs if x[4] is not None)
    return {
        "front": front.name, "streams": streams, "rate": rate, "n": n, "target": target,
        "events_per_s": received / window if received else 0.0, "window_s": window, "wall_s": wall,
        "expected_events": expected, "received_events": received, "lost_events": expected - received,
        "streams_complete": sum(1 for x in recs if x[4] is None), "statuses": dict(Counter(x[0] for x in recs)),
        "errors": dict(errors),
        "gap_p50_ms": pct_zeros(gaps, zeros, 50) * 1e3, "gap_p99_ms": pct_zeros(gaps, zeros, 99) * 1e3,
        "gap_max_ms": (gaps[-1] if gaps else 0.0) * 1e3, "gaps_zero_share": zeros / max(1, len(gaps) + zeros),
        "first_p50_ms": pct_zeros(firsts, 0, 50) * 1e3, "first_p99_ms": pct_zeros(firsts, 0, 99) * 1e3,
        "front_cpu_s": cpu1 - cpu0 if front.proc is not None else None,
        "front_rss_mib_after": front.proc.memory_info().rss / MIB if front.proc is not None else None,
        "upstream_cpu_s": up1 - up0, "loadgen_cpu_s": r["cpu_s"],
    }


def print_table(results: dict[str, dict]) -> None:
    """Fronts as columns."""
    names = list(results)
    nginx = results.get("nginx")

    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    rows = [
        ("events/s", [f(results[x]["events_per_s"], ",.0f") for x in names]),
        ("vs nginx", [f(results[x]["events_per_s"] / nginx["events_per_s"], ".3f") if nginx and
                      nginx["events_per_s"] else "-" for x in names]),
        ("streams complete", [f"{results[x]['streams_complete']}/{results[x]['streams']}" for x in names]),
        ("lost events", [f(results[x]["lost_events"], ",d") for x in names]),
        ("gap p50 ms", [f(results[x]["gap_p50_ms"], ".2f") for x in names]),
        ("gap p99 ms", [f(results[x]["gap_p99_ms"], ".2f") for x in names]),
        ("gap max ms", [f(results[x]["gap_max_ms"], ".1f") for x in names]),
        ("first event p50 ms", [f(results[x]["first_p50_ms"], ".2f") for x in names]),
        ("first event p99 ms", [f(results[x]["first_p99_ms"], ".2f") for x in names]),
        ("front CPU s", [f(results[x]["front_cpu_s"], ".2f") for x in names]),
        ("front RSS MiB after", [f(results[x]["front_rss_mib_after"], ".1f") for x in names]),
        ("upstream CPU s", [f(results[x]["upstream_cpu_s"], ".2f") for x in names]),
        ("loadgen CPU s", [f(results[x]["loadgen_cpu_s"], ".2f") for x in names]),
        ("wall s", [f(results[x]["wall_s"], ".1f") for x in names]),
    ]
    print(f"{'':20s}" + "".join(f"{x:>16s}" for x in names))
    for label, cells in rows:
        print(f"{label:20s}" + "".join(f"{v:>16s}" for v in cells))
    for x in names:
        if results[x]["errors"]:
            print(f"{x}: streams not clean: {results[x]['errors']}")


def verdict(results: dict[str, dict], streams: int, rate: float) -> dict | None:
    """gpu-supervisor's events/s against nginx's, and the issue's target for this scenario (if it has one)."""
    if "gpu-supervisor" not in results or "nginx" not in results or not results["nginx"]["events_per_s"]:
        return None
    ratio = results["gpu-supervisor"]["events_per_s"] / results["nginx"]["events_per_s"]
    target = TARGETS.get((streams, rate))
    out = {"supervisor_vs_nginx": ratio, "target": target, "pass": None if target is None else ratio >= target,
           "supervisor_lost_events": results["gpu-supervisor"]["lost_events"]}
    line = f"gpu-supervisor / nginx events/s = {ratio:.3f}x"
    if target is None:
        line += " (no target for this scenario)"
    else:
        line += f", target >= {target:.2f}x: {'PASS' if out['pass'] else 'FAIL'}"
    if out["supervisor_lost_events"]:
        line += f"; gpu-supervisor lost {out['supervisor_lost_events']:,} events"
    print(line)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=None, help="streams at once (with --rate: one scenario)")
    ap.add_argument("--rate", type=float, default=None, help="events/s per stream (default: both issue scenarios)")
    ap.add_argument("--seconds", type=float, default=10.0, help="each stream lasts this long (n = rate x seconds)")
    ap.add_argument("--size", type=int, default=64, help="payload bytes per event")
    ap.add_argument("--procs", type=int, default=1, help="load generator processes")
    ap.add_argument("--only", default=",".join(FRONTS), help=f"fronts, comma-separated, of {','.join(FRONTS)}")
    ap.add_argument("--tree", type=Path, default=ROOT,
                    help="the source tree whose supervisor/ runs (default: this one)")
    ap.add_argument("--upstream", choices=("raw", "aiohttp"), default="raw")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    fronts = [f.strip() for f in args.only.split(",") if f.strip()]
    bad = [f for f in fronts if f not in FRONTS]
    if bad or not fronts:
        ap.error(f"--only: unknown fronts {bad}; choose from {FRONTS}")
    fronts = [f for f in FRONTS if f in fronts]
    if args.procs < 1:
        ap.error("--procs must be >= 1")
    tree = args.tree.resolve()
    check_tree(tree)
    if args.streams is None and args.rate is None:
        scenarios = list(SCENARIOS)
    else:
        scenarios = [(args.streams or SCENARIOS[0][0], args.rate or SCENARIOS[0][1])]
    max_streams = max(s for s, _ in scenarios)

    tmp = Path(tempfile.mkdtemp(prefix="gs-stream-"))
    procs: list[subprocess.Popen] = []
    try:
        direct_port = free_port()
        ports: dict[str, int] = {"direct": direct_port}
        owners: dict[str, psutil.Process | None] = {"direct": None}
        if "gpu-supervisor" in fronts:
            sup_port = free_port()
            policy = supervisor_policy(sup_port, tmp / "run", direct_port, args.upstream, max(1024, max_streams))
            sup, sock = start_supervisor(tmp, policy, tree, procs)
            upstream = upstream_of(sup)
            ports["gpu-supervisor"] = sup_port
            owners["gpu-supervisor"] = psutil.Process(sup.pid)
        else:
            up, sock = start_upstream(tmp, direct_port, args.upstream, procs)
            upstream = psutil.Process(up.pid)
        if "nginx" in fronts:
            ports["nginx"] = free_port()
            owners["nginx"] = start_nginx(tmp, sock, ports["nginx"], procs)
        print(f"upstream: {args.upstream} (pid {upstream.pid}); supervisor tree: {tree}; load generator: "
              f"{args.procs} process(es); {psutil.cpu_count()} CPUs", flush=True)
        res: dict = {"tree": str(tree), "upstream": args.upstream, "seconds": args.seconds, "size": args.size,
                     "procs": args.procs, "fronts": fronts, "scenarios": {}}
        for streams, rate in scenarios:
            key = f"{streams}x{rate:g}"
            print(f"\n== {streams} streams x {rate:g} events/s, {args.seconds:g} s each "
                  f"({streams * rate:,.0f} events/s offered) ==", flush=True)
            results: dict[str, dict] = {}
            for name in fronts:
                r = measure(Front(name, ports[name], owners[name]), upstream, streams, rate, args.seconds,
                            args.procs, args.size)
                results[name] = r
                print(f"{name:15s} {r['events_per_s']:>10,.0f} events/s  complete {r['streams_complete']}/{streams}"
                      f"  lost {r['lost_events']:,}  gap p99 {r['gap_p99_ms']:.2f} ms  first p99 "
                      f"{r['first_p99_ms']:.2f} ms", flush=True)
                time.sleep(1)  # the streams' connections close on every side before the next front
            print()
            print_table(results)
            res["scenarios"][key] = {"streams": streams, "rate": rate, "results": results,
                                     "verdict": verdict(results, streams, rate)}
        out = save_results(res, HERE / "results" / "stream.json", args.out)
        print(f"\nwrote {out}")
        return 0
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    raise SystemExit(main())
