"""A test OTLP/HTTP trace receiver: an aiohttp server on 127.0.0.1 that accepts POST /v1/traces, decodes the
real protobuf (ExportTraceServiceRequest, from opentelemetry-proto) and keeps the spans for assertions; it
can refuse exports (`status = 503`)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

from aiohttp import web
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

KINDS = {PbSpan.SPAN_KIND_INTERNAL: "internal", PbSpan.SPAN_KIND_SERVER: "server",
         PbSpan.SPAN_KIND_CLIENT: "client", PbSpan.SPAN_KIND_PRODUCER: "producer",
         PbSpan.SPAN_KIND_CONSUMER: "consumer"}


@dataclass
class SpanRecord:
    """One received span, its ids as lowercase hex (parent "" for a root)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attributes: dict
    links: list[tuple[str, str]]
    status_code: int
    service: str | None
    start_ns: int
    end_ns: int
    resource: dict = field(default_factory=dict)


def _value(v) -> object:
    d = MessageToDict(v)
    if not d:
        return None
    kind, val = next(iter(d.items()))
    return int(val) if kind == "intValue" else val


def _attrs(kvs) -> dict:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(body: bytes) -> list[SpanRecord]:
    """The spans of one ExportTraceServiceRequest."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(SpanRecord(
                    name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                    kind=KINDS.get(s.kind, str(s.kind)), attributes=_attrs(s.attributes),
                    links=[(ln.trace_id.hex(), ln.span_id.hex()) for ln in s.links], status_code=s.status.code,
                    service=resource.get("service.name"), start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano, resource=resource))
    return out


class OtlpReceiver:
    """`async with OtlpReceiver() as rx:` then point `tracing.endpoint` at `rx.endpoint`."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.exports = 0  # POSTs answered 200
        self.refused = 0  # POSTs answered `status`
        self.status = 200
        self.headers_seen: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.headers_seen.append(dict(request.headers))
        if self.status != 200:
            self.refused += 1
            return web.Response(status=self.status, text="refused on purpose")
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text=f"not protobuf: {request.content_type}")
        self.spans += decode(body)
        self.exports += 1
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def __aenter__(self) -> OtlpReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- reading what came ---------------------------------------------------------------------------
    def named(self, name: str, **attrs: object) -> list[SpanRecord]:
        return [s for s in self.spans if s.name == name and all(s.attributes.get(k) == v for k, v in attrs.items())]

    def children(self, parent: SpanRecord, name: str | None = None) -> list[SpanRecord]:
        return [s for s in self.spans if s.parent_id == parent.span_id and s.trace_id == parent.trace_id
                and (name is None or s.name == name)]
