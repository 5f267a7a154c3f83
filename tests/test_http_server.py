"""The front end's own HTTP/1.1 server (supervisor/http/server.py) against a real listening socket: strict
parsing and its limits, timeouts, flow control, pipelining, HTTP/1.0, 100-continue, chunked bodies, clients
that vanish, and a corpus of hostile requests. Driven with raw asyncio streams and sockets, and aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import socket
import struct
import time
from typing import NamedTuple

import aiohttp
import pytest

from supervisor.http.server import BodyTooLarge, HttpConnection, HttpServer, Request, Responder, ServerLimits
from supervisor.http.wire import STATUS_LINES, Headers, unquote_path
from tests.harness import wait_until

MIB = 1 << 20
T = 10.0  # the deadline for any one wait in these tests (they finish in well under a second each)


class Seen:
    """Collects on_error(status, etype) calls."""

    def __init__(self) -> None:
        self.errors: list[tuple[int, str | None]] = []

    def __call__(self, status: int, etype: str | None) -> None:
        self.errors.append((status, etype))


@contextlib.asynccontextmanager
async def serving(handler, on_error=None, grace_s: float = 1.0, **limits):
    server = HttpServer(handler, ServerLimits(**limits), on_error=on_error)
    addrs = await server.start("127.0.0.1", 0)
    try:
        yield server, addrs[0][1]
    finally:
        await server.close(grace_s)


async def echo(request: Request, responder: Responder) -> None:
    """Reads the whole body and sends it back, with the method and path as headers."""
    body = await request.read(16 * MIB)
    await responder.send(200, [(b"Content-Type", b"text/plain"), (b"X-Method", request.method.encode()),
                               (b"X-Path", request.path.encode("utf-8"))], body)


class Answer(NamedTuple):
    status: int
    headers: dict[bytes, bytes]  # lower-cased names
    body: bytes
    head: bytes  # the raw head, as sent


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        if size == 0:
            assert await reader.readexactly(2) == b"\r\n"
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        assert await reader.readexactly(2) == b"\r\n"


async def read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> Answer | None:
    """One answer off a raw connection; None when the connection closed before any byte of it."""
    async with asyncio.timeout(T):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise AssertionError(f"connection closed inside an answer head: {exc.partial!r}") from None
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            assert k.lower() not in headers, f"header {k!r} twice in {head!r}"
            headers[k.strip().lower()] = v.strip()
        if head_only or status < 200 or status in (204, 304):
            body = b""
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = await read_chunked(reader)
        else:
            body = await reader.read()  # delimited by the end of the connection
        return Answer(status, headers, body, head)


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    """What is left before the server closes (or half-closes) the connection."""
    async with asyncio.timeout(T):
        return await reader.read()


async def roundtrip(port: int, raw: bytes) -> list[Answer]:
    """Write `raw` on a fresh connection; every answer until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        answers = []
        while (a := await read_answer(reader)) is not None:
            answers.append(a)
        return answers
    finally:
        writer.close()


async def served(port: int) -> None:
    """A fresh connection still gets an answer."""
    answers = await roundtrip(port, b"GET /alive HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert [a.status for a in answers] == [200]


def error_of(a: Answer) -> dict:
    assert a.headers[b"content-type"] == b"application/json"
    assert a.headers[b"connection"] == b"close"
    return json.loads(a.body)


def req(line: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


H = b"Host: x"
CLOSE = b"Connection: close"
CHUNKED_OK = b"3\r\nabc\r\n0\r\n\r\n"

# (name, raw request, the status it must get, or "close": closed with no answer)
CORPUS: list[tuple[str, bytes, int | str]] = [
    # request smuggling shapes
    ("cl_te", req(b"POST / HTTP/1.1", H, b"Content-Length: 4", b"Transfer-Encoding: chunked", body=CHUNKED_OK), 400),
    ("te_cl", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", b"Content-Length: 4", body=CHUNKED_OK), 400),
    ("te_te_duplicate", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked",
                            body=CHUNKED_OK), 400),
    ("te_gzip_then_chunked_lines", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: gzip",
                                       b"Transfer-Encoding: chunked", body=CHUNKED_OK), 400),
    ("te_chunked_identity", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked, identity", body=CHUNKED_OK),
     400),
    ("te_identity_chunked", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: identity, chunked", body=CHUNKED_OK),
     400),
    ("te_gzip_chunked", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: gzip, chunked", body=CHUNKED_OK), 400),
    ("te_identity", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: identity", body=b"abc"), 400),
    ("te_xchunked", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: xchunked", body=CHUNKED_OK), 400),
    ("te_leading_comma", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: ,chunked", body=CHUNKED_OK), 400),
    ("te_space_before_colon", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding : chunked", body=CHUNKED_OK), 400),
    ("te_vertical_tab", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: \x0bchunked", body=CHUNKED_OK), 400),
    ("te_on_http10", req(b"POST / HTTP/1.0", H, b"Transfer-Encoding: chunked", body=CHUNKED_OK), 400),
    ("te_odd_casing_allowed", req(b"POST / HTTP/1.1", H, b"transfer-ENCODING: ChUnKeD", CLOSE, body=CHUNKED_OK),
     200),
    ("te_tab_ows_allowed", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding:\tchunked", CLOSE, body=CHUNKED_OK), 200),
    ("te_trailing_spaces_allowed", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked  ", CLOSE,
                                       body=CHUNKED_OK), 200),
    ("te_trailing_tab", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked\t", body=CHUNKED_OK), 400),
    ("cl_duplicate_equal", req(b"POST / HTTP/1.1", H, b"Content-Length: 3", b"Content-Length: 3", body=b"abc"),
     400),
    ("cl_duplicate_other_case", req(b"POST / HTTP/1.1", H, b"Content-Length: 3", b"content-length: 3",
                                    body=b"abc"), 400),
    ("cl_list", req(b"POST / HTTP/1.1", H, b"Content-Length: 3, 3", body=b"abc"), 400),
    ("cl_negative", req(b"POST / HTTP/1.1", H, b"Content-Length: -3", body=b"abc"), 400),
    ("cl_plus_sign", req(b"POST / HTTP/1.1", H, b"Content-Length: +3", body=b"abc"), 400),
    ("cl_hex", req(b"POST / HTTP/1.1", H, b"Content-Length: 0x3", body=b"abc"), 400),
    ("cl_not_a_number", req(b"POST / HTTP/1.1", H, b"Content-Length: abc", body=b"abc"), 400),
    ("cl_empty", req(b"POST / HTTP/1.1", H, b"Content-Length: ", body=b"abc"), 400),
    ("cl_overflow", req(b"POST / HTTP/1.1", H, b"Content-Length: 99999999999999999999999", body=b"abc"), 400),
    ("cl_over_max_body", req(b"POST / HTTP/1.1", H, b"Content-Length: 1099511627776", body=b"abc"), 413),
    ("cl_over_max_body_expect", req(b"POST / HTTP/1.1", H, b"Expect: 100-continue",
                                    b"Content-Length: 1099511627776"), 413),
    ("host_duplicate", req(b"GET / HTTP/1.1", H, b"Host: evil"), 400),
    ("host_duplicate_other_case", req(b"GET / HTTP/1.1", H, b"HOST: x"), 400),
    # RFC 9112 3.2 (found by tests/test_http_fuzz.py against h11; it was answered 200)
    ("host_missing_on_http11", req(b"GET / HTTP/1.1", CLOSE), 400),
    ("host_missing_on_http11_pipelined", req(b"GET / HTTP/1.1") + req(b"GET /b HTTP/1.1", H, CLOSE), 400),
    # bytes that are not allowed in a head
    ("nul_in_header_value", req(b"GET / HTTP/1.1", H, b"X-A: a\x00b"), 400),
    ("nul_in_header_name", req(b"GET / HTTP/1.1", H, b"X\x00A: ab"), 400),
    ("nul_in_target", req(b"GET /a\x00b HTTP/1.1", H), 400),
    ("nul_before_method", b"\x00" + req(b"GET / HTTP/1.1", H), 400),
    ("control_char_in_value", req(b"GET / HTTP/1.1", H, b"X-A: a\x01b"), 400),
    ("del_in_value", req(b"GET / HTTP/1.1", H, b"X-A: a\x7fb"), 400),
    ("obs_fold_space", req(b"GET / HTTP/1.1", H, b"X-A: a", b" folded"), 400),
    ("obs_fold_tab", req(b"GET / HTTP/1.1", H, b"X-A: a", b"\tfolded"), 400),
    ("space_before_first_header", req(b"GET / HTTP/1.1", b" Host: x"), 400),
    ("space_in_header_name", req(b"GET / HTTP/1.1", H, b"X A: b"), 400),
    ("header_without_colon", req(b"GET / HTTP/1.1", H, b"XYZ"), 400),
    ("empty_header_name", req(b"GET / HTTP/1.1", H, b": v"), 400),
    # line ends
    ("bare_lf_everywhere", b"GET / HTTP/1.1\nHost: x\n\n", 400),
    ("bare_lf_in_headers", b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400),
    ("bare_cr_after_line", b"GET / HTTP/1.1\rHost: x\r\n\r\n", 400),
    ("bare_cr_in_headers", b"GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400),
    ("cr_without_lf_at_end", b"GET / HTTP/1.1\r\nHost: x\r\n\rX", 400),
    # methods, targets, versions
    ("unknown_method", req(b"FOO / HTTP/1.1", H), 400),
    ("lowercase_method", req(b"get / HTTP/1.1", H), 400),
    ("tab_after_method", req(b"GET\t/ HTTP/1.1", H), 400),
    ("space_in_target", req(b"GET /a b HTTP/1.1", H), 400),
    ("non_ascii_target", req(b"GET /\xc3\xa9 HTTP/1.1", H), 400),
    ("target_without_slash", req(b"GET abc HTTP/1.1", H), 400),
    ("target_query_only", req(b"GET ?a=1 HTTP/1.1", H), 400),
    ("version_1_2", req(b"GET / HTTP/1.2", H), 400),
    ("version_lowercase", req(b"GET / http/1.1", H), 400),
    ("version_trailing_space", req(b"GET / HTTP/1.1 ", H), 400),
    ("version_2_0_line", req(b"GET / HTTP/2.0", H), 400),
    ("version_0_9_explicit", req(b"GET / HTTP/0.9", H), 400),
    ("rtsp_version", req(b"GET / RTSP/1.0", H), 400),
    ("rtsp_method_and_version", req(b"PLAY / RTSP/1.0", H), 400),
    ("ice_source", req(b"SOURCE / ICE/1.0", H), 400),
    ("http2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("http09_bare_line", b"GET /x\r\n", "close"),
    ("http09_bare_line_lf", b"GET /x\n", "close"),
    ("http09_line_then_headers", b"GET /x\r\nHost: x\r\n\r\n", "close"),
    # sizes
    ("request_line_too_long", req(b"GET /" + b"a" * 9000 + b" HTTP/1.1", H), 414),
    ("header_field_too_long", req(b"GET / HTTP/1.1", H, b"X-Long: " + b"a" * 9000), 431),
    ("too_many_headers", req(b"GET / HTTP/1.1", H, *(b"X-%d: v" % i for i in range(128))), 431),
    # chunked bodies
    ("chunk_size_negative", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", body=b"-3\r\nabc\r\n0\r\n\r\n"),
     400),
    ("chunk_size_overflow", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked",
                                body=b"FFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n"), 400),
    ("chunk_size_hex_prefix", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked",
                                  body=b"0x3\r\nabc\r\n0\r\n\r\n"), 400),
    ("chunk_size_trailing_space", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked",
                                      body=b"3 \r\nabc\r\n0\r\n\r\n"), 400),
    ("chunk_data_overrun", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked",
                               body=b"3\r\nabcX\r\n0\r\n\r\n"), 400),
    ("chunk_bare_lf", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", body=b"3\nabc\n0\n\n"), 400),
    ("chunk_nul_in_extension", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked",
                                   body=b"3;a=\x00\r\nabc\r\n0\r\n\r\n"), 400),
    ("chunk_extension_allowed", req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", CLOSE,
                                    body=b"3;name=value\r\nabc\r\n0\r\n\r\n"), 200),
    # garbage
    ("tls_client_hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)), 400),
    ("binary_garbage", bytes(range(256)) * 4, 400),
    ("only_spaces", b" " * 64 + b"\r\n\r\n", 400),
    # shapes that are fine here (the request path judges them)
    ("absolute_form_target", req(b"GET http://example.com/a%20b?c=1 HTTP/1.1", b"Host: example.com", CLOSE), 200),
    ("asterisk_form_options", req(b"OPTIONS * HTTP/1.1", H, CLOSE), 200),
    ("connect_authority_form", req(b"CONNECT example.com:443 HTTP/1.1", b"Host: example.com:443"), 200),
    ("connect_with_tunnel_bytes", req(b"CONNECT example.com:443 HTTP/1.1", b"Host: example.com:443",
                                      body=b"\x16\x03\x01garbage"), 200),
    ("upgrade_h2c_ignored", req(b"GET / HTTP/1.1", H, b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c",
                                b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"), 200),
    ("leading_empty_line", b"\r\n" + req(b"GET / HTTP/1.1", H, CLOSE), 200),
    ("obs_text_in_value_allowed", req(b"GET / HTTP/1.1", H, b"X-A: caf\xe9", CLOSE), 200),

    ("http10_without_host", req(b"GET / HTTP/1.0"), 200),
]


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 30
    assert len({name for name, _, _ in CORPUS}) == len(CORPUS)
    assert sum(1 for *_, want in CORPUS if want != 200) >= 30


@pytest.mark.parametrize("name,raw,want", CORPUS, ids=[c[0] for c in CORPUS])
async def test_corpus(name: str, raw: bytes, want: int | str):
    seen = Seen()
    async with serving(echo, on_error=seen) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            a = await read_answer(reader)
            if want == "close":
                assert a is None, f"{name}: answered {a}"
                assert seen.errors == [(400, "bad_request")]
            elif want == 200:
                assert a is not None and a.status == 200, f"{name}: {a}"
                assert seen.errors == []
            else:
                assert a is not None and a.status == want, f"{name}: {a}"
                err = error_of(a)
                etype = "payload_too_large" if want == 413 else "bad_request"
                assert err == {"error": {"type": etype, "message": err["error"]["message"], "request_id": None}}
                assert err["error"]["message"].startswith("malformed HTTP request: ")
                assert seen.errors == [(want, etype)]
                assert await read_eof(reader) == b""  # and the connection is closed after it
        finally:
            writer.close()
        await served(port)  # the server still serves a fresh connection


async def test_error_messages_say_what_was_wrong():
    async with serving(echo) as (_, port):
        for raw, words in [
            (req(b"GET / HTTP/1.1", H, b"Host: y"), "duplicate Host"),
            (req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: gzip, chunked", body=CHUNKED_OK), "Transfer-Encoding"),
            (req(b"GET /" + b"a" * 9000 + b" HTTP/1.1", H), "request line over 8190 bytes"),
            (req(b"GET / HTTP/1.1", H, b"X-Long: " + b"a" * 9000), "over 8190 bytes"),
            (req(b"GET / HTTP/1.1", H, *(b"X-%d: v" % i for i in range(128))), "over 128 header fields"),
            (req(b"POST / HTTP/1.1", H, b"Content-Length: 99999999999"), "Content-Length 99999999999"),
            (req(b"GET / HTTP/2.0", H), "HTTP/2.0"),
        ]:
            [a] = await roundtrip(port, raw)
            assert words in error_of(a)["error"]["message"], (raw[:60], a.body)


# -- limits at their bounds ----------------------------------------------------------------------------------
async def test_request_line_limit_is_exact():
    async with serving(echo) as (_, port):
        target = b"/" + b"a" * (8190 - len(b"GET ") - len(b" HTTP/1.1") - 1)
        line = b"GET " + target + b" HTTP/1.1"
        assert len(line) == 8190
        [a] = await roundtrip(port, req(line, H, CLOSE))
        assert a.status == 200 and a.headers[b"x-path"] == target
        [a] = await roundtrip(port, req(b"GET " + target + b"a HTTP/1.1", H, CLOSE))
        assert a.status == 414
        # a longer method leaves less room for the target
        [a] = await roundtrip(port, req(b"OPTIONS " + target + b" HTTP/1.1", H, CLOSE))
        assert a.status == 414


async def test_header_field_limit_is_exact():
    async with serving(echo) as (_, port):
        field = b"X-Long: " + b"v" * (8190 - 8)
        assert len(field) == 8190
        [a] = await roundtrip(port, req(b"GET / HTTP/1.1", H, field, CLOSE))
        assert a.status == 200
        [a] = await roundtrip(port, req(b"GET / HTTP/1.1", H, field + b"v", CLOSE))
        assert a.status == 431
        long_name = b"X-" + b"n" * (8190 - 2 - 3) + b": v"
        [a] = await roundtrip(port, req(b"GET / HTTP/1.1", H, long_name + b"v", CLOSE))
        assert a.status == 431


async def test_header_count_limit_is_exact():
    async with serving(echo) as (_, port):
        fields = [b"X-%d: v" % i for i in range(126)]  # + Host + Connection = 128
        [a] = await roundtrip(port, req(b"GET / HTTP/1.1", H, CLOSE, *fields))
        assert a.status == 200
        [a] = await roundtrip(port, req(b"GET / HTTP/1.1", H, CLOSE, *fields, b"X-One-More: v"))
        assert a.status == 431


async def test_trailers_count_against_the_header_limit_and_are_not_kept():
    got = []

    async def handler(request: Request, responder: Responder) -> None:
        body = await request.read(MIB)
        got.append((body, list(request.raw_headers)))
        await responder.send(200, [], body)

    async with serving(handler, max_headers=4) as (_, port):
        ok = req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", CLOSE, body=b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
        [a] = await roundtrip(port, ok)
        assert a.status == 200 and a.body == b"abc"
        assert [k for k, _ in got[0][1]] == [b"Host", b"Transfer-Encoding", b"Connection"]
        over = req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", CLOSE,
                   body=b"3\r\nabc\r\n0\r\nX-T: 1\r\nX-U: 2\r\n\r\n")
        [a] = await roundtrip(port, over)
        assert a.status == 400 and "over 4 header fields" in error_of(a)["error"]["message"]


async def _trickle_until_answered(port: int, start: bytes, piece: bytes, most: int) -> tuple[Answer | None, int]:
    """Send `start`, then `piece` over and over (never a line end) until the server answers; (answer, bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    answered = asyncio.Event()

    async def trickle() -> None:
        nonlocal sent
        writer.write(start)
        while sent < most and not answered.is_set():
            writer.write(piece)
            sent += len(piece)
            await writer.drain()

    task = asyncio.create_task(trickle())
    try:
        a = await read_answer(reader)
        answered.set()
        return a, sent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await task
        writer.close()


async def test_an_unfinished_header_line_is_refused_before_it_ends():
    """llhttp keeps an unfinished header line itself: the server bounds it without waiting for its end."""
    async with serving(echo) as (_, port):
        a, sent = await _trickle_until_answered(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ", b"a" * 4096,
                                                64 * MIB)
        assert a is not None and a.status == 431
        assert sent < 16 * MIB, "the line was not bounded"
        a, sent = await _trickle_until_answered(port, b"GET /", b"a" * 4096, 64 * MIB)
        assert a is not None and a.status == 414
        assert sent < 16 * MIB
        await served(port)


# -- timeouts ------------------------------------------------------------------------------------------------
async def test_slowloris_head_is_closed_after_header_timeout():
    async with serving(echo, header_timeout_s=0.3, keepalive_timeout_s=30) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = req(b"GET / HTTP/1.1", H, b"X-Slow: " + b"z" * 400)
        sent = 0

        async def byte_by_byte() -> None:  # the hostile client: one byte every 20 ms (a whole head takes 9 s)
            nonlocal sent
            for b in head:
                writer.write(bytes([b]))
                sent += 1
                await asyncio.sleep(0.02)

        t0 = time.monotonic()
        task = asyncio.create_task(byte_by_byte())
        try:
            a = await read_answer(reader)
            assert await read_eof(reader) == b""
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
            writer.close()
        assert time.monotonic() - t0 >= 0.25  # (the server's clock started at its accept, a hair before t0)
        assert sent < len(head)
        assert a is not None and a.status == 408
        assert json.loads(a.body)["error"]["type"] == "request_timeout"
        await served(port)


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer():
    async with serving(echo, header_timeout_s=0.3, keepalive_timeout_s=30) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        assert await read_eof(reader) == b""
        assert time.monotonic() - t0 >= 0.25  # (the server's clock started at its accept, a hair before t0)
        writer.close()
        await wait_until(lambda: server.open_connections == 0, T, "the connection to be forgotten")


async def test_idle_kept_alive_connection_is_closed_after_keepalive_timeout():
    async with serving(echo, header_timeout_s=30, keepalive_timeout_s=0.3) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"GET /one HTTP/1.1", H))
        a = await read_answer(reader)
        assert a is not None and a.status == 200 and b"connection" not in a.headers
        t0 = time.monotonic()
        assert await read_eof(reader) == b""  # closed, and no 408: no request had begun
        assert time.monotonic() - t0 >= 0.25
        writer.close()


async def _client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a small receive buffer: what it does not read stays in the server's buffers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def test_a_client_that_reads_nothing_is_dropped_and_one_that_reads_is_not():
    big = bytes(range(256)) * (32 * 1024)  # 8 MiB: more than the kernel's socket buffers hold

    async def answer_big(request: Request, responder: Responder) -> None:
        await responder.send(200, [(b"Content-Type", b"application/octet-stream")], big)

    async with serving(answer_big, keepalive_timeout_s=0.2, send_timeout_s=1.0) as (server, port):
        reader, writer = await _client(port)
        writer.write(req(b"GET /big HTTP/1.1", H))
        # it reads nothing: the answer waits in the server's buffer until send_timeout_s without progress
        await wait_until(lambda: server.open_connections == 0, 30, "the client that reads nothing dropped")
        got = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 16):
                got += chunk
        assert len(got) < len(big)  # cut: it never had the whole answer
        writer.close()

        reader, writer = await _client(port)
        writer.write(req(b"GET /big HTTP/1.1", H))
        a = await read_answer(reader)  # reads as fast as its small buffer lets it: never dropped
        assert a is not None and a.status == 200 and a.body == big
        writer.close()


async def test_keepalive_clock_restarts_with_each_answer():
    async with serving(echo, header_timeout_s=30, keepalive_timeout_s=0.4) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(3):
            writer.write(req(b"GET /%d HTTP/1.1" % i, H))
            a = await read_answer(reader)
            assert a is not None and a.status == 200
        assert await read_eof(reader) == b""
        writer.close()


async def test_no_timer_per_request():
    """One lazily re-armed timer per connection: many requests on one connection arm only a few timers."""
    loop = asyncio.get_running_loop()
    armed = 0
    real_call_at = loop.call_at

    def counting_call_at(when, callback, *args, **kwargs):
        nonlocal armed
        if isinstance(getattr(callback, "__self__", None), HttpConnection):  # (asyncio.timeout arms timers too)
            armed += 1
        return real_call_at(when, callback, *args, **kwargs)

    async with serving(echo) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop.call_at = counting_call_at  # type: ignore[method-assign]
        try:
            for i in range(200):
                writer.write(req(b"GET /%d HTTP/1.1" % i, H))
                a = await read_answer(reader)
                assert a is not None and a.status == 200
        finally:
            del loop.call_at
        writer.close()
    assert armed <= 2


async def test_answered_requests_leave_no_reference_cycles():
    """A request and its answer are freed by reference counting: a cycle per request would leave the
    cyclic GC a full collection every few thousand requests (a 10-20 ms pause at every p99)."""
    async with serving(echo) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(50):
                writer.write(req(b"GET /%d HTTP/1.1" % i, H))
                a = await read_answer(reader)
                assert a is not None and a.status == 200
            # two pipelined (the second answer waits for the first) and one with a body
            writer.write(req(b"GET /p1 HTTP/1.1", H) + req(b"POST /p2 HTTP/1.1", H, b"Content-Length: 3", body=b"abc"))
            assert (await read_answer(reader)).status == 200 and (await read_answer(reader)).body == b"abc"
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage if type(o) in (Request, Responder)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
        writer.close()
    assert left == []


# -- the answers ---------------------------------------------------------------------------------------------
async def test_request_record_and_headers_view():
    got: list[Request] = []

    async def handler(request: Request, responder: Responder) -> None:
        got.append(request)
        await responder.send(204, [])

    async with serving(handler) as (_, port):
        raw = req(b"GET /v1/a%20b/%E2%82%AC?x=1&y=%20 HTTP/1.1", b"Host: example", b"X-Twice: one",
                  b"x-twice: two", b"Accept: */*", CLOSE)
        [a] = await roundtrip(port, raw)
        assert a.status == 204 and b"content-length" not in a.headers
    r = got[0]
    assert (r.method, r.raw_path, r.path, r.query_string) == ("GET", "/v1/a%20b/%E2%82%AC?x=1&y=%20", "/v1/a b/€",
                                                              "x=1&y=%20")
    assert r.version == (1, 1) and r.keep_alive is False and r.remote == "127.0.0.1" and r.scheme == "http"
    assert (r.content_length, r.chunked, r.body_exists, r.expect_continue) == (None, False, False, False)
    assert r.raw_headers == [(b"Host", b"example"), (b"X-Twice", b"one"), (b"x-twice", b"two"), (b"Accept", b"*/*"),
                             (b"Connection", b"close")]
    h = r.headers
    assert h.get("host") == "example" and h.get("X-TWICE") == "one" and h.get("nope") is None
    assert h.get("nope", "dflt") == "dflt" and h["Accept"] == "*/*"
    assert h.getall("x-twice") == ["one", "two"] and h.getall("nope") == [] and h.getall("nope", ()) == ()
    assert "ACCEPT" in h and "nope" not in h and len(h) == 5
    assert list(h.items())[1] == ("X-Twice", "one")
    with pytest.raises(KeyError):
        h["nope"]
    assert r.transport_closed


def test_headers_view_and_path_decoding_alone():
    h = Headers([(b"Content-Type", b"a\xe9")])
    assert h.get("content-type") == "a\xe9" and list(h) == ["Content-Type"]
    twice = Headers([(b"X-A", b"1"), (b"Host", b"h"), (b"x-a", b"2")])
    assert twice.get("x-A") == "1" and twice.getall("X-A") == ["1", "2"] and twice.get("X-B", "no") == "no"
    assert "HOST" in twice and "X-B" not in twice
    assert unquote_path("/a%2Fb") == "/a/b"  # as aiohttp's request.path
    assert unquote_path("/%FF%ZZ") == "/%FF%ZZ"  # not UTF-8, not %XX: left as sent
    assert unquote_path("/a+b") == "/a+b"
    assert STATUS_LINES[200] == b"HTTP/1.1 200 OK\r\n" and STATUS_LINES[503].startswith(b"HTTP/1.1 503 ")


async def test_target_forms():
    got: list[Request] = []

    async def handler(request: Request, responder: Responder) -> None:
        got.append(request)
        await responder.send(200, [])

    async with serving(handler) as (_, port):
        await roundtrip(port, req(b"GET http://h:1/p%20q?x=2#frag HTTP/1.1", b"Host: h:1", CLOSE))
        await roundtrip(port, req(b"OPTIONS * HTTP/1.1", H, CLOSE))
        await roundtrip(port, req(b"CONNECT h:443 HTTP/1.1", b"Host: h:443"))
        await roundtrip(port, req(b"GET /a?b#c HTTP/1.1", H, CLOSE))
    assert [(r.raw_path, r.path, r.query_string) for r in got] == [
        ("http://h:1/p%20q?x=2#frag", "/p q", "x=2"), ("*", "*", ""), ("h:443", "", ""), ("/a?b#c", "/a", "b")]
    assert got[2].keep_alive is False  # CONNECT: nothing after its head is HTTP


async def test_upgrade_is_ignored_and_the_connection_stays_http11():
    """No 101 here: an Upgrade request is a plain request, its body arrives, what follows it is HTTP/1.1
    (aiohttp hung on an h2c upgrade with a body, which `curl --http2` sends to http:// URLs)."""
    h2c = (b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
    async with serving(echo) as (_, port):
        answers = await roundtrip(port, req(b"POST /a HTTP/1.1", H, *h2c, b"Content-Length: 5", body=b"hello")
                                  + req(b"POST /b HTTP/1.1", H, *h2c, b"Transfer-Encoding: chunked", body=CHUNKED_OK)
                                  + req(b"GET /c HTTP/1.1", H, b"Connection: Upgrade", b"Upgrade: websocket")
                                  + req(b"GET /d HTTP/1.1", H, CLOSE))
        assert [(a.status, a.headers[b"x-path"], a.body) for a in answers] == [
            (200, b"/a", b"hello"), (200, b"/b", b"abc"), (200, b"/c", b""), (200, b"/d", b"")]
        assert all(b"connection" not in a.headers for a in answers[:3])
        # an upgrade request that closes: nothing after it is read
        answers = await roundtrip(port, req(b"POST /e HTTP/1.1", H, b"Connection: Upgrade, close", b"Upgrade: h2c",
                                            b"Content-Length: 2", body=b"hi") + req(b"GET /never HTTP/1.1", H))
        assert [(a.status, a.body) for a in answers] == [(200, b"hi")]


async def test_connect_tunnel_bytes_are_not_read_as_requests():
    async with serving(echo) as (_, port):
        answers = await roundtrip(port, req(b"CONNECT h:443 HTTP/1.1", b"Host: h:443")
                                  + req(b"GET /smuggled HTTP/1.1", H))
        assert [(a.status, a.headers[b"x-method"], a.headers[b"connection"]) for a in answers] == [
            (200, b"CONNECT", b"close")]


async def test_send_is_one_write_with_a_preencoded_status_line():
    writes: list[bytes] = []

    async def handler(request: Request, responder: Responder) -> None:
        conn = request._conn
        real = conn._transport

        class Spy:
            def __getattr__(self, name):
                return getattr(real, name)

            def write(self, data: bytes) -> None:
                writes.append(data)
                real.write(data)

        conn._transport = Spy()
        try:
            await responder.send(200, [(b"Content-Type", b"text/plain")], b"hello")
        finally:
            conn._transport = real

    async with serving(handler) as (_, port):
        [a] = await roundtrip(port, req(b"GET / HTTP/1.1", H, CLOSE))
    assert a.body == b"hello"
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\nhello")
    assert b"\r\nDate: " in writes[0] and b"\r\nContent-Length: 5\r\n" in writes[0]


async def test_head_answer_has_length_and_no_body():
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send(200, [(b"Content-Type", b"text/plain")], b"twelve bytes")

    async with serving(handler) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"HEAD /x HTTP/1.1", H) + req(b"GET /y HTTP/1.1", H, CLOSE))  # pipelined behind it
        a = await read_answer(reader, head_only=True)
        assert a is not None and a.status == 200 and a.headers[b"content-length"] == b"12"
        b = await read_answer(reader)  # parses cleanly: no body followed the HEAD answer
        assert b is not None and b.status == 200 and b.body == b"twelve bytes"
        assert await read_eof(reader) == b""
        writer.close()


async def test_head_streamed_answer_writes_no_body():
    async def handler(request: Request, responder: Responder) -> None:
        await responder.start(200, [], 5)
        await responder.write(b"hello")
        await responder.end()

    async with serving(handler) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"HEAD / HTTP/1.1", H, CLOSE))
        a = await read_answer(reader, head_only=True)
        assert a is not None and a.headers[b"content-length"] == b"5"
        assert await read_eof(reader) == b""
        writer.close()


async def test_pipelined_requests_are_answered_in_order_even_when_a_later_handler_finishes_first():
    first_may_answer = asyncio.Event()
    finished: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        name = request.path.strip("/")
        if name == "first":
            await first_may_answer.wait()
            await responder.send(200, [], b"first")
        elif name == "second":
            await responder.send(200, [], b"second")  # out of turn: held, the handler is done at once
        elif name == "third":
            await request.read(MIB)
            first_may_answer.set()
            await responder.start(200, [], None)  # waits for the two before it
            await responder.write(b"thi")
            await responder.write(b"rd")
            await responder.end()
        else:
            await responder.send(200, [], name.encode())
        finished.append(name)

    async with serving(handler) as (_, port):
        raw = (req(b"GET /first HTTP/1.1", H) + req(b"GET /second HTTP/1.1", H)
               + req(b"POST /third HTTP/1.1", H, b"Content-Length: 3", body=b"xyz")
               + req(b"GET /fourth HTTP/1.1", H, CLOSE))
        answers = await roundtrip(port, raw)
    assert [a.body for a in answers] == [b"first", b"second", b"third", b"fourth"]
    assert answers[2].headers[b"transfer-encoding"] == b"chunked"
    assert finished.index("second") < finished.index("first")
    assert sorted(finished) == ["first", "fourth", "second", "third"]


async def test_pipelined_error_comes_after_the_answers_before_it():
    seen = Seen()
    async with serving(echo, on_error=seen) as (_, port):
        answers = await roundtrip(port, req(b"GET /a HTTP/1.1", H) + req(b"GET /b HTTP/1.1", H) + b"GARBAGE\r\n\r\n")
        assert [a.status for a in answers] == [200, 200, 400]
        assert [a.headers.get(b"x-path") for a in answers[:2]] == [b"/a", b"/b"]
        assert seen.errors == [(400, "bad_request")]


async def test_too_many_pipelined_requests_pause_reading_until_answered():
    release = asyncio.Event()
    started: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        started.append(request.path)
        await release.wait()
        await responder.send(200, [], request.path.encode())

    async with serving(handler, max_pipelined=2) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(req(b"GET /%d HTTP/1.1" % i, H) for i in range(5)) + req(b"GET /5 HTTP/1.1", H, CLOSE))
        await wait_until(lambda: server.connections and next(iter(server.connections)).reading_paused, T,
                         "reading to pause")
        conn = next(iter(server.connections))
        assert not conn.transport.is_reading()
        release.set()
        bodies = []
        while (a := await read_answer(reader)) is not None:
            bodies.append(a.body)
        assert bodies == [b"/%d" % i for i in range(6)]
        writer.close()


async def test_http10_gets_no_chunks_and_closes_unless_kept_alive():
    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/stream":
            await responder.start(200, [(b"Content-Type", b"text/plain")], None)
            for piece in (b"one ", b"two ", b"three"):
                await responder.write(piece)
            await responder.end()
        else:
            await responder.send(200, [], b"whole")

    async with serving(handler) as (_, port):
        [a] = await roundtrip(port, req(b"GET /stream HTTP/1.0"))
        assert a.status == 200 and a.body == b"one two three"
        assert b"transfer-encoding" not in a.headers and b"content-length" not in a.headers
        assert a.headers[b"connection"] == b"close"
        [a] = await roundtrip(port, req(b"GET /whole HTTP/1.0"))
        assert a.body == b"whole" and a.headers[b"content-length"] == b"5" and a.headers[b"connection"] == b"close"
        # keep-alive asked for: kept, and said so
        answers = await roundtrip(port, req(b"GET /whole HTTP/1.0", b"Connection: keep-alive")
                                  + req(b"GET /whole HTTP/1.0", b"Connection: keep-alive")
                                  + req(b"GET /stream HTTP/1.0", b"Connection: keep-alive"))
        assert [a.body for a in answers] == [b"whole", b"whole", b"one two three"]
        assert [a.headers[b"connection"] for a in answers] == [b"keep-alive", b"keep-alive", b"close"]


async def test_connection_close_is_honoured_on_http11():
    async with serving(echo) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"GET /a HTTP/1.1", H, b"Connection: close") + req(b"GET /b HTTP/1.1", H))
        a = await read_answer(reader)
        assert a is not None and a.headers[b"connection"] == b"close" and a.headers[b"x-path"] == b"/a"
        assert await read_eof(reader) == b""  # /b is never read
        writer.close()


async def test_handler_connection_close_header_closes_after_the_answer():
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send(200, [(b"Connection", b"close")], b"bye")

    async with serving(handler) as (_, port):
        answers = await roundtrip(port, req(b"GET / HTTP/1.1", H) + req(b"GET / HTTP/1.1", H))
        assert len(answers) == 1 and answers[0].headers[b"connection"] == b"close"


async def test_chunked_answer_and_streamed_answer_with_length():
    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/chunked":
            await responder.start(200, [(b"Content-Type", b"text/event-stream")], None)
            for i in range(5):
                await responder.write(b"data: %d\n\n" % i)
            await responder.write(b"")  # nothing: no empty chunk (that would end the body)
            await responder.end()
        else:
            await responder.start(200, [], 10)
            await responder.write(b"01234")
            with pytest.raises(RuntimeError):
                await responder.write(b"too long!!")
            await responder.write(b"56789")
            await responder.end()

    async with serving(handler) as (_, port):
        answers = await roundtrip(port, req(b"GET /chunked HTTP/1.1", H) + req(b"GET /sized HTTP/1.1", H, CLOSE))
        assert answers[0].headers[b"transfer-encoding"] == b"chunked"
        assert answers[0].body == b"".join(b"data: %d\n\n" % i for i in range(5))
        assert answers[1].headers[b"content-length"] == b"10" and answers[1].body == b"0123456789"


async def test_a_streamed_answer_shorter_than_its_length_closes_the_connection():
    async def handler(request: Request, responder: Responder) -> None:
        await responder.start(200, [], 10)
        await responder.write(b"short")
        await responder.end()

    async with serving(handler) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"GET / HTTP/1.1", H))
        assert (await read_answer(reader, head_only=True)).headers[b"content-length"] == b"10"  # type: ignore[union-attr]
        assert await read_eof(reader) == b"short"
        writer.close()


async def test_chunked_request_bodies_read_and_iterated():
    got: dict[str, object] = {}

    async def handler(request: Request, responder: Responder) -> None:
        assert request.chunked and request.body_exists and request.content_length is None
        if request.path == "/read":
            got["read"] = await request.read(MIB)
        else:
            pieces = [p async for p in request.iter_chunks(4)]
            got["pieces"] = pieces
        await responder.send(200, [], b"ok")

    async with serving(handler) as (_, port):
        for path in (b"/read", b"/iter"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(req(b"POST " + path + b" HTTP/1.1", H, b"Transfer-Encoding: chunked", CLOSE))
            pieces = (b"5;ext=1\r\nhello\r\n", b"1", b"\r\n \r\n", b"6\r\nworld!\r", b"\n0\r\nX-Trailer: t\r\n\r\n")
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
            a = await read_answer(reader)
            assert a is not None and a.status == 200
            writer.close()
    assert got["read"] == b"hello world!"
    pieces = got["pieces"]
    assert b"".join(pieces) == b"hello world!" and all(0 < len(p) <= 4 for p in pieces)  # type: ignore[union-attr]


async def test_read_limit_raises_body_too_large():
    outcomes = []

    async def handler(request: Request, responder: Responder) -> None:
        try:
            await request.read(10)
        except BodyTooLarge as exc:
            outcomes.append(exc.limit)
            await responder.send(413, [], b"too big")
            return
        await responder.send(200, [], b"fine")

    async with serving(handler) as (_, port):
        [a] = await roundtrip(port, req(b"POST / HTTP/1.1", H, b"Content-Length: 11", CLOSE, body=b"x" * 11))
        assert a.status == 413
        [a] = await roundtrip(port, req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", CLOSE,
                                        body=b"6\r\nxxxxxx\r\n6\r\nxxxxxx\r\n0\r\n\r\n"))
        assert a.status == 413
        [a] = await roundtrip(port, req(b"POST / HTTP/1.1", H, b"Content-Length: 10", CLOSE, body=b"x" * 10))
        assert a.status == 200
    assert outcomes == [10, 10]


# -- 100-continue --------------------------------------------------------------------------------------------
def _peek_nothing(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    return False


async def test_expect_continue_nothing_written_until_send_continue():
    arrived = asyncio.Event()
    go = asyncio.Event()
    bodies = []

    async def handler(request: Request, responder: Responder) -> None:
        assert request.expect_continue
        arrived.set()
        await go.wait()
        await request.send_continue()
        await request.send_continue()  # once only
        bodies.append(await request.read(MIB))
        await responder.send(200, [], b"got it")

    loop = asyncio.get_running_loop()
    async with serving(handler) as (_, port):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setblocking(False)
            await loop.sock_sendall(sock, req(b"POST / HTTP/1.1", H, b"Expect: 100-continue", b"Content-Length: 5"))
            async with asyncio.timeout(T):
                await arrived.wait()
            # the head was parsed and the handler runs: a 100 written by the server before now would be here
            assert _peek_nothing(sock)
            go.set()
            got = b""
            async with asyncio.timeout(T):
                while not got.endswith(b"\r\n\r\n"):
                    got += await loop.sock_recv(sock, 1)
            assert got == b"HTTP/1.1 100 Continue\r\n\r\n"
            await loop.sock_sendall(sock, b"hello")
            rest = b""
            async with asyncio.timeout(T):
                while not rest.endswith(b"got it"):
                    rest += await loop.sock_recv(sock, 4096)
            assert rest.startswith(b"HTTP/1.1 200 OK\r\n") and b"100 Continue" not in rest
    assert bodies == [b"hello"]


async def test_expect_continue_with_trailing_whitespace_is_honoured():
    """Regression (found by tests/test_http_fuzz.py): the whitespace after a field value is OWS, not part of it."""
    async def handler(request: Request, responder: Responder) -> None:
        await request.send_continue()
        await responder.send(200, [], await request.read(10))

    async with serving(handler) as (_, port):
        for value in (b"100-continue ", b"100-Continue\t", b"100-continue \t "):
            raw = req(b"POST / HTTP/1.1", H, b"Expect: " + value, b"Content-Length: 2", CLOSE, body=b"ab")
            [cont, a] = await roundtrip(port, raw)
            assert (cont.status, cont.head) == (100, b"HTTP/1.1 100 Continue\r\n\r\n")
            assert a.status == 200 and a.body == b"ab"


async def test_expect_continue_refused_first_never_sends_100():
    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/alive":
            await responder.send(200, [], b"alive")
            return
        await responder.send(503, [(b"Retry-After", b"1")], b"busy")

    async with serving(handler) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"POST / HTTP/1.1", H, b"Expect: 100-continue", b"Content-Length: 100000"))
        a = await read_answer(reader)
        assert a is not None and a.status == 503 and a.body == b"busy"
        # the body never came: the connection cannot carry another request
        assert a.headers[b"connection"] == b"close"
        assert await read_eof(reader) == b""
        writer.close()
        await served(port)


async def test_expect_continue_is_ignored_on_http10():
    got = []

    async def handler(request: Request, responder: Responder) -> None:
        got.append(request.expect_continue)
        await request.send_continue()  # a no-op
        await responder.send(200, [], await request.read(10))

    async with serving(handler) as (_, port):
        [a] = await roundtrip(port, req(b"POST / HTTP/1.0", b"Expect: 100-continue", b"Content-Length: 2", body=b"ab"))
        assert a.status == 200 and a.body == b"ab"
    assert got == [False]


# -- flow control --------------------------------------------------------------------------------------------
async def test_large_body_pauses_reading_and_resumes_as_it_drains():
    size = 8 * MIB
    payload = (hashlib.sha256(b"seed").digest() * (size // 32 + 1))[:size]
    may_read = asyncio.Event()
    arrived = asyncio.Event()
    result: dict[str, object] = {}

    async def handler(request: Request, responder: Responder) -> None:
        arrived.set()
        await may_read.wait()
        digest = hashlib.sha256()
        paused_seen = resumed_seen = 0
        most = 0
        async for piece in request.iter_chunks(32 * 1024):
            digest.update(piece)
            most = max(most, request._size)
            if request._conn.reading_paused:
                paused_seen += 1
            else:
                resumed_seen += 1
            await asyncio.sleep(0)  # a slow reader: the client outruns it
        result.update(digest=digest.hexdigest(), paused=paused_seen, resumed=resumed_seen, most=most)
        await responder.send(200, [], b"done")

    async with serving(handler) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"POST /big HTTP/1.1", H, b"Content-Length: %d" % size, CLOSE))

        async def upload() -> None:
            for i in range(0, size, 256 * 1024):
                writer.write(payload[i:i + 256 * 1024])
                await writer.drain()

        up = asyncio.create_task(upload())
        async with asyncio.timeout(T):
            await arrived.wait()
        conn = next(iter(server.connections))
        await wait_until(lambda: conn.reading_paused and not conn.transport.is_reading(), T, "reading to pause")
        buffered = conn.queue[0]._req._size
        assert 64 * 1024 < buffered <= 64 * 1024 + 512 * 1024  # read_buffer_bytes and at most a read or two past
        may_read.set()
        a = await read_answer(reader)
        async with asyncio.timeout(T):
            await up
        writer.close()
    assert a is not None and a.status == 200
    assert result["digest"] == hashlib.sha256(payload).hexdigest()
    assert result["paused"] and result["resumed"]  # paused again and again, resumed as it drained
    assert result["most"] <= 64 * 1024 + 512 * 1024


# -- clients that vanish -------------------------------------------------------------------------------------
def _reset_on_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_client_vanishing_during_upload_cancels_the_handler(how: str):
    events: list[str] = []
    reading = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/alive":
            await responder.send(200, [], b"alive")
            return
        try:
            async for _ in request.iter_chunks(65536):
                reading.set()
            events.append("body ended")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async with serving(handler) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"POST /up HTTP/1.1", H, b"Content-Length: %d" % (4 * MIB), body=b"x" * 100_000))
        async with asyncio.timeout(T):
            await reading.wait()
        if how == "reset":
            _reset_on_close(writer)
        writer.close()
        await wait_until(lambda: events, T, "the handler to end")
        assert events == ["cancelled"]
        await wait_until(lambda: server.open_connections == 0, T, "the connection to go")
        await served(port)


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_client_vanishing_mid_answer_cancels_the_handler(how: str):
    events: list[str] = []
    streaming = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/alive":
            await responder.send(200, [], b"alive")
            return
        await responder.start(200, [], None)
        try:
            while True:
                await responder.write(b"x" * 65536)  # waits while the client's socket is full
                streaming.set()
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async with serving(handler) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"GET /stream HTTP/1.1", H))
        assert (await read_answer(reader, head_only=True)).status == 200  # type: ignore[union-attr]
        async with asyncio.timeout(T):
            await streaming.wait()
            await reader.readexactly(100_000)
        if how == "reset":
            _reset_on_close(writer)
        writer.close()
        await wait_until(lambda: events, T, "the handler to be cancelled")
        assert events == ["cancelled"]
        await served(port)


async def test_client_vanishing_while_the_handler_waits_cancels_it():
    events: list[str] = []
    waiting = asyncio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/alive":
            await responder.send(200, [], b"alive")
            return
        waiting.set()
        try:
            await asyncio.Event().wait()  # queued for a worker, say
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async with serving(handler) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"GET /wait HTTP/1.1", H))
        async with asyncio.timeout(T):
            await waiting.wait()
        writer.close()
        await wait_until(lambda: events, T, "the handler to be cancelled")
        await served(port)


async def test_a_finished_answer_is_not_cancelled_when_the_client_leaves():
    after = asyncio.Event()
    events: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        await responder.send(200, [], b"done")
        try:
            await after.wait()  # book-keeping after the answer (metrics, logs)
            events.append("finished")
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    async with serving(handler) as (server, port):
        await roundtrip(port, req(b"GET / HTTP/1.1", H, CLOSE))
        await wait_until(lambda: server.open_connections == 0, T, "the connection to go")
        after.set()
        await wait_until(lambda: events, T, "the handler to finish")
    assert events == ["finished"]


async def test_handler_closing_the_connection_is_not_an_error():
    seen = Seen()

    async def handler(request: Request, responder: Responder) -> None:
        request.close()
        await asyncio.sleep(0)

    async with serving(handler, on_error=seen) as (_, port):
        assert await roundtrip(port, req(b"GET / HTTP/1.1", H)) == []
    assert seen.errors == []


async def test_an_answer_sent_mid_upload_reaches_the_client():
    """Refused before its body is read: the answer goes out, then the server half-closes and drops what the
    client still sends (closing at once with unread bytes would reset the connection, answer and all)."""
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send(413, [(b"Content-Type", b"text/plain")], b"no thanks")

    async with serving(handler, linger_s=5.0) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        size = 16 * MIB
        writer.write(req(b"POST / HTTP/1.1", H, b"Content-Length: %d" % size))

        async def upload() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(size // (256 * 1024)):
                    writer.write(b"u" * (256 * 1024))
                    await writer.drain()

        up = asyncio.create_task(upload())
        a = await read_answer(reader)
        assert a is not None and a.status == 413 and a.body == b"no thanks" and a.headers[b"connection"] == b"close"
        assert await read_eof(reader) == b""
        conn = next(iter(server.connections), None)
        assert conn is None or conn.lingering
        async with asyncio.timeout(T):
            await up  # the rest of the upload is read and dropped, not refused
        writer.close()
        await wait_until(lambda: server.open_connections == 0, T, "the lingering connection to close")


# -- handlers that fail --------------------------------------------------------------------------------------
async def test_a_handler_failing_after_its_answer_keeps_the_connection():
    async def handler(request: Request, responder: Responder) -> None:
        await responder.send(200, [], request.path.encode())
        if request.path == "/fail":
            raise RuntimeError("book-keeping broke")

    async with serving(handler) as (_, port):
        answers = await roundtrip(port, req(b"GET /fail HTTP/1.1", H) + req(b"GET /next HTTP/1.1", H, CLOSE))
        assert [a.body for a in answers] == [b"/fail", b"/next"]


async def test_handler_failures_get_an_answer_or_a_cut():
    seen = Seen()

    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/raise":
            raise RuntimeError("boom")
        if request.path == "/silent":
            return
        if request.path == "/framing":
            await responder.send(200, [(b"Content-Length", b"3")], b"abc")
        if request.path == "/split":
            await responder.send(200, [(b"X-A", b"a\r\nX-Injected: 1")], b"abc")
        if request.path == "/too-big":
            await request.read(1)
        if request.path == "/cut":
            await responder.start(200, [], None)
            await responder.write(b"partial")
            raise RuntimeError("mid-stream")

    async with serving(handler, on_error=seen) as (_, port):
        for path in (b"/raise", b"/silent", b"/framing", b"/split"):
            [a] = await roundtrip(port, req(b"GET " + path + b" HTTP/1.1", H))
            assert a.status == 500, path
            assert error_of(a) == {"error": {"type": "internal_error", "message": "internal error in gpu-supervisor",
                                             "request_id": None}}
        [a] = await roundtrip(port, req(b"POST /too-big HTTP/1.1", H, b"Content-Length: 2", body=b"ab"))
        assert a.status == 413 and error_of(a)["error"]["type"] == "payload_too_large"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"GET /cut HTTP/1.1", H))
        a = await read_answer(reader, head_only=True)
        assert a is not None and a.headers[b"transfer-encoding"] == b"chunked"
        assert await read_eof(reader) == b"7\r\npartial\r\n"  # no last chunk: the client sees a broken body
        writer.close()
    assert seen.errors == [(500, None)] * 4 + [(413, "payload_too_large")]


async def test_malformed_chunked_body_under_a_running_handler():
    """The body breaks after the head reached the handler: its read raises, and let through it is a 400."""
    seen = Seen()
    async with serving(echo, on_error=seen) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req(b"POST / HTTP/1.1", H, b"Transfer-Encoding: chunked", body=b"5\r\nhello\r\n"))
        await writer.drain()
        writer.write(b"zz\r\n")
        a = await read_answer(reader)
        assert a is not None and a.status == 400 and "chunk" in error_of(a)["error"]["message"]
        writer.close()
    assert seen.errors == [(400, "bad_request")]


# -- shutting down -------------------------------------------------------------------------------------------
async def test_close_lets_in_flight_handlers_finish_then_cancels_the_rest():
    release = asyncio.Event()
    events: list[str] = []

    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/quick":
            await responder.send(200, [], b"quick")
            return
        try:
            if request.path == "/finishes":
                await release.wait()
                await responder.send(200, [], b"finished")
                events.append("finished")
            else:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append(f"cancelled {request.path}")
            raise

    server = HttpServer(handler, ServerLimits())
    port = (await server.start("127.0.0.1", 0))[0][1]
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    idle_w.write(req(b"GET /quick HTTP/1.1", H))
    assert (await read_answer(idle_r)).body == b"quick"  # type: ignore[union-attr]
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
    busy_w.write(req(b"GET /finishes HTTP/1.1", H))
    stuck_r, stuck_w = await asyncio.open_connection("127.0.0.1", port)
    stuck_w.write(req(b"GET /stuck HTTP/1.1", H))
    await wait_until(lambda: len(server._handler_tasks()) == 2, T, "both handlers to run")

    closing = asyncio.create_task(server.close(1.0))
    assert await read_eof(idle_r) == b""  # idle: closed at once
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer listening
    release.set()
    a = await read_answer(busy_r)
    assert a is not None and a.body == b"finished" and a.headers[b"connection"] == b"close"
    assert await read_eof(busy_r) == b""
    async with asyncio.timeout(T):
        await closing
    assert await read_eof(stuck_r) == b""
    assert events == ["finished", "cancelled /stuck"]
    assert server.open_connections == 0
    for w in (idle_w, busy_w, stuck_w):
        w.close()


# -- with a real client --------------------------------------------------------------------------------------
async def test_aiohttp_client_against_the_server():
    async def handler(request: Request, responder: Responder) -> None:
        if request.path == "/stream":
            await responder.start(200, [(b"Content-Type", b"text/plain")], None)
            for i in range(100):
                await responder.write(b"%04d" % i)
            await responder.end()
        elif request.method == "POST":
            body = await request.read(16 * MIB)
            await responder.send(200, [(b"X-Chunked", b"yes" if request.chunked else b"no")],
                                 hashlib.sha256(body).hexdigest().encode())
        else:
            await responder.send(200, [(b"Content-Type", b"application/json")],
                                 json.dumps({"path": request.path, "q": request.query_string}).encode())

    async def gen():
        for i in range(64):
            yield bytes([i]) * 1000

    async with serving(handler) as (server, port):
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            async with s.get(f"{base}/a/b?x=1") as r:
                assert r.status == 200 and await r.json() == {"path": "/a/b", "q": "x=1"}
                assert "Date" in r.headers
            big = bytes(range(256)) * 8192  # 2 MiB
            async with s.post(f"{base}/up", data=big) as r:
                assert await r.text() == hashlib.sha256(big).hexdigest() and r.headers["X-Chunked"] == "no"
            async with s.post(f"{base}/up", data=gen()) as r:
                body = b"".join(bytes([i]) * 1000 for i in range(64))
                assert await r.text() == hashlib.sha256(body).hexdigest() and r.headers["X-Chunked"] == "yes"
            async with s.get(f"{base}/stream") as r:
                assert await r.read() == b"".join(b"%04d" % i for i in range(100))
            async with s.head(f"{base}/h") as r:
                assert r.status == 200 and int(r.headers["Content-Length"]) > 0
            assert server.open_connections == 1  # all of it on one kept-alive connection


# -- uvloop --------------------------------------------------------------------------------------------------
def test_runs_on_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        seen = Seen()
        async with serving(echo, on_error=seen) as (server, port):
            answers = await roundtrip(port, req(b"POST /u HTTP/1.1", H, b"Content-Length: 3", body=b"abc")
                                      + req(b"POST /v HTTP/1.1", H, b"Transfer-Encoding: chunked", CLOSE,
                                            body=CHUNKED_OK))
            assert [(a.status, a.body) for a in answers] == [(200, b"abc"), (200, b"abc")]
            [a] = await roundtrip(port, req(b"GET / HTTP/1.1", H, H))
            assert a.status == 400 and seen.errors == [(400, "bad_request")]
            # flow control on uvloop's transport
            release = asyncio.Event()

            async def slow(request: Request, responder: Responder) -> None:
                await release.wait()
                await responder.send(200, [], hashlib.sha256(await request.read(8 * MIB)).digest())

            server.handler = slow
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = b"u" * (4 * MIB)
            writer.write(req(b"POST / HTTP/1.1", H, b"Content-Length: %d" % len(payload), CLOSE, body=payload))
            await wait_until(lambda: any(c.reading_paused and not c.transport.is_reading()
                                         for c in server.connections), T, "reading to pause")
            release.set()
            a = await read_answer(reader)
            assert a is not None and a.body == hashlib.sha256(payload).digest()
            writer.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
