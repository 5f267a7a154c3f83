"""A local OTLP/HTTP trace sink for benchmarks: accepts POST /v1/traces (200, an empty
ExportTraceServiceResponse), counts exports, spans and bytes; GET /stats answers them as JSON.

    python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


def make_app() -> web.Application:
    stats = {"exports": 0, "spans": 0, "bytes": 0}

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        stats["exports"] += 1
        stats["bytes"] += len(body)
        stats["spans"] += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def get_stats(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(stats), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_get("/stats", get_stats)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
