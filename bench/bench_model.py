"""Model serving through gpu-supervisor vs straight to the worker: what does the supervisor cost?

Starts gpu-supervisor twice, each in front of the built-in model_worker: a tiny GPT-2 (built here by
`python -m model_worker.tiny_model`) and MiniLM (`--model minilm`). Each config has a fixed
`runtime_dir`, so the worker's own Unix socket (<tmp>/run/default-0-1.sock) can be reached directly:
both paths hit the SAME worker process. Sequential requests (one at a time), alternating between
the paths request by request (so drift and other load on the machine fall on both alike), each
workload for --duration seconds per path (tokens/s and embeddings/s count request time only):

- generation: non-streaming /v1/completions, greedy, max_tokens fixed, `ignore_eos` -> tokens/s
- streaming: the same with `stream: true` (SSE) -> tokens/s and time to the first chunk
- embeddings: /v1/embeddings with batches of 16 short inputs (MiniLM) -> embeddings/s

Also the worker start time (spawn to ready, from gpu_supervisor_worker_start_seconds_sum) of both
models. Prints a table with the supervisor/direct ratios and writes bench/results/model.json.

    python bench/bench_model.py [--duration 10] [--max-tokens 64] [--threads 1] [--device auto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402

EMBED_INPUTS = [
    "a cat sits on the mat", "a kitten plays with wool", "stock markets fell today", "the dollar was steady",
    "a server answers requests", "the model ran out of memory", "hello, how are you?", "rain is expected",
    "the river flows to the sea", "bonds rose on friday", "a dog barks at night", "music from the radio",
    "the first computers were huge", "phones are powerful now", "red, green and blue", "monday to sunday",
]


class Supervised:
    """One `gpu-supervisor run` with a model_worker behind it, and sessions for both paths."""

    def __init__(self, tmp: Path, name: str, worker_args: list[str], threads: int, device: str):
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.socket = self.dir / "run" / "default-0-1.sock"  # <worker>-<replica>-<generation>.sock
        self.log = self.dir / "supervisor.log"
        command = ["{python}", "-m", "model_worker", "--socket", "{socket}", *worker_args,
                   "--threads", str(threads), "--device", device]
        policy = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "runtime_dir": str(self.dir / "run"),
            "worker": {"command": command, "startup_timeout_s": 300, "hang_timeout_s": 300,
                       "health": {"interval_s": 2, "timeout_s": 5, "failures": 3}},
            "queue": {"concurrency": 1, "pools": {"cpu": {"concurrency": 4}}},
            "routes": [
                {"path": "/v1/embeddings", "priority": "high", "pool": "cpu", "timeout_s": 60},
                {"path": "/v1/completions", "methods": ["POST"], "timeout_s": 120, "retry": True},
            ],
            "logging": {"format": "json", "level": "info"},
        }
        (self.dir / "policy.yaml").write_text(json.dumps(policy))
        self.proc = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(self.dir / "policy.yaml")],
                                     cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        self.via: aiohttp.ClientSession | None = None
        self.direct: aiohttp.ClientSession | None = None

    async def ready(self, timeout: float = 300.0) -> None:
        self.via = aiohttp.ClientSession(f"http://127.0.0.1:{self.port}", timeout=aiohttp.ClientTimeout(total=300))
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpu-supervisor exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                async with self.via.get("/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready within {timeout}s:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        self.direct = aiohttp.ClientSession("http://worker", connector=aiohttp.UnixConnector(path=str(self.socket)),
                                            timeout=aiohttp.ClientTimeout(total=300))

    async def start_seconds(self) -> float:
        """Spawn to first healthy answer, as the supervisor measured it."""
        assert self.via is not None
        async with self.via.get("/metrics") as r:
            text = await r.text()
        for line in text.splitlines():
            if line.startswith("gpu_supervisor_worker_start_seconds_sum"):
                return float(line.rsplit(" ", 1)[1])
        raise RuntimeError("no gpu_supervisor_worker_start_seconds_sum in /metrics")

    async def worker_info(self) -> dict:
        assert self.direct is not None
        async with self.direct.get("/healthz") as r:
            return await r.json()

    async def close(self) -> None:
        for s in (self.via, self.direct):
            if s is not None:
                await s.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- one request of each kind: returns (units done, time to first byte of the body or None) ----

def completion(max_tokens: int) -> Callable[[aiohttp.ClientSession], Awaitable[tuple[int, float | None]]]:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    async def call(s: aiohttp.ClientSession) -> tuple[int, float | None]:
        async with s.post("/v1/completions", json=body) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"{r.status}: {answer}")
        return answer["usage"]["completion_tokens"], None
    return call


def streaming(max_tokens: int) -> Callable[[aiohttp.ClientSession], Awaitable[tuple[int, float | None]]]:
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}

    async def call(s: aiohttp.ClientSession) -> tuple[int, float | None]:
        t0 = time.perf_counter()
        first = None
        buf = b""
        async with s.post("/v1/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"{r.status}: {await r.text()}")
            async for chunk in r.content.iter_any():
                if first is None:
                    first = time.perf_counter() - t0
                buf += chunk
        events = [line[6:] for line in buf.decode().splitlines() if line.startswith("data: ")]
        if events[-1] != "[DONE]":
            raise RuntimeError("stream did not end with [DONE]")
        return json.loads(events[-2])["usage"]["completion_tokens"], first
    return call


def embedding(batch: list[str]) -> Callable[[aiohttp.ClientSession], Awaitable[tuple[int, float | None]]]:
    body = {"model": "minilm", "input": batch}

    async def call(s: aiohttp.ClientSession) -> tuple[int, float | None]:
        async with s.post("/v1/embeddings", json=body) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"{r.status}: {answer}")
        return len(answer["data"]), None
    return call


async def one(call, session: aiohttp.ClientSession, acc: dict) -> None:
    t0 = time.perf_counter()
    units, first = await call(session)
    dt = time.perf_counter() - t0
    acc["units"] += units
    acc["seconds"] += dt
    acc["latencies"].append(dt)
    if first is not None:
        acc["first"].append(first)


async def compare(sp: Supervised, call, seconds: float, warmup: int = 3) -> dict:
    """Sequential requests, alternating between the two paths (direct, supervisor, supervisor, direct,
    ...) so that drift and other load on the machine fall on both alike; `seconds` per path."""
    assert sp.via is not None and sp.direct is not None
    for s in (sp.direct, sp.via):
        for _ in range(warmup):
            await call(s)
    accs = {p: {"units": 0, "seconds": 0.0, "latencies": [], "first": []} for p in ("direct", "supervisor")}
    sessions = {"direct": sp.direct, "supervisor": sp.via}
    order = ("direct", "supervisor")
    end = time.perf_counter() + 2 * seconds
    while time.perf_counter() < end:
        for path in order:
            await one(call, sessions[path], accs[path])
        order = order[::-1]
    out = {}
    for path, a in accs.items():
        lat = sorted(a["latencies"])
        out[path] = {
            "requests": len(lat),
            "units": a["units"],
            "units_per_s": a["units"] / a["seconds"],
            "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            **({"first_chunk_p50_ms": 1000 * statistics.median(a["first"])} if a["first"] else {}),
        }
    out["ratio"] = out["supervisor"]["units_per_s"] / out["direct"]["units_per_s"]
    out["added_p50_ms"] = out["supervisor"]["p50_ms"] - out["direct"]["p50_ms"]
    return out


async def amain(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="gs-bm-"))
    started: list[Supervised] = []
    try:
        model_dir = Path(args.tiny_model) if args.tiny_model else tmp / "tiny-gpt2"
        subprocess.run([PY, "-m", "model_worker.tiny_model", str(model_dir)], cwd=ROOT, check=True,
                       capture_output=True, timeout=600)
        results: dict = {"workloads": {}, "start_s": {}}

        tiny = Supervised(tmp, "tiny", ["--model", str(model_dir)], args.threads, args.device)
        started.append(tiny)
        await tiny.ready()
        results["start_s"]["tiny-gpt2"] = await tiny.start_seconds()
        results["tiny_worker"] = {k: v for k, v in (await tiny.worker_info()).items()
                                  if k in ("model", "device", "dtype", "context_length")}
        print(f"tiny-gpt2 ready in {results['start_s']['tiny-gpt2']:.2f}s; generation, "
              f"{args.duration:g}s per path ...", flush=True)
        results["workloads"]["generate"] = await compare(tiny, completion(args.max_tokens), args.duration)
        print("streaming ...", flush=True)
        results["workloads"]["stream"] = await compare(tiny, streaming(args.max_tokens), args.duration)
        await tiny.close()

        minilm = Supervised(tmp, "minilm", ["--model", "minilm", "--task", "embed"], args.threads, args.device)
        started.append(minilm)
        await minilm.ready()
        results["start_s"]["minilm"] = await minilm.start_seconds()
        print(f"minilm ready in {results['start_s']['minilm']:.2f}s; embeddings ...", flush=True)
        results["workloads"]["embed"] = await compare(minilm, embedding(EMBED_INPUTS[:args.batch]), args.duration)
        await minilm.close()
        return results
    finally:
        for sp in started:
            await sp.close()
        shutil.rmtree(tmp, ignore_errors=True)


UNITS = {"generate": "tokens/s", "stream": "tokens/s", "embed": "embeddings/s"}


def print_table(results: dict, args: argparse.Namespace) -> None:
    print()
    print(f"{'workload':10s} {'unit':13s} {'direct':>10s} {'supervisor':>11s} {'ratio':>7s} "
          f"{'p50 direct':>11s} {'p50 sup':>9s} {'added p50':>10s}  requests")
    for name, w in results["workloads"].items():
        d, s = w["direct"], w["supervisor"]
        print(f"{name:10s} {UNITS[name]:13s} {d['units_per_s']:10.1f} {s['units_per_s']:11.1f} {w['ratio']:7.3f} "
              f"{d['p50_ms']:9.2f}ms {s['p50_ms']:7.2f}ms {w['added_p50_ms']:8.2f}ms  {d['requests']}/{s['requests']}")
    st = results["workloads"]["stream"]
    print(f"streaming first chunk p50: direct {st['direct']['first_chunk_p50_ms']:.2f} ms, "
          f"supervisor {st['supervisor']['first_chunk_p50_ms']:.2f} ms")
    print("worker start (spawn to ready): " + ", ".join(f"{k} {v:.2f}s" for k, v in results["start_s"].items()))
    worst = min(w["ratio"] for w in results["workloads"].values())
    print(f"worst supervisor/direct ratio {worst:.3f} (target >= 0.95: the supervisor costs < 5%): "
          f"{'ok' if worst >= 0.95 else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per workload and path (default 10)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per completion (default 64)")
    ap.add_argument("--batch", type=int, default=16, choices=range(1, len(EMBED_INPUTS) + 1), metavar="N",
                    help="inputs per embeddings request (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the worker (default 1)")
    ap.add_argument("--device", default="auto", help="model_worker --device (default auto)")
    ap.add_argument("--tiny-model", default=None, help="an existing tiny model folder (default: build one)")
    ap.add_argument("--out", default=str(HERE / "results" / "model.json"))
    args = ap.parse_args()
    results = asyncio.run(amain(args))
    print_table(results, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results["settings"] = {"duration_s": args.duration, "max_tokens": args.max_tokens, "batch": args.batch,
                           "threads": args.threads, "device": args.device, "sequential": True}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()}
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
