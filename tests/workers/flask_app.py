"""An unchanged Flask service: ``python -m gunicorn --bind unix:SOCK --workers 1 tests.workers.flask_app:app``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request

app = Flask(__name__)


@app.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok", "pid": os.getpid()}


@app.get("/hello")
def hello() -> Response:
    return Response("hello", mimetype="text/plain")


@app.post("/v1/echo")
def echo() -> dict[str, Any]:
    return {"json": request.get_json(silent=True), "pid": os.getpid()}


@app.get("/block")
def block() -> dict[str, Any]:
    """Hold the request `s` seconds after writing this process's pid to the file `marker` (a test kills
    the process meanwhile); once the marker exists (a retry), answer at once."""
    marker = request.args["marker"]
    if os.path.exists(marker):
        return {"pid": os.getpid(), "held": False}
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    time.sleep(request.args.get("s", 60.0, type=float))  # the user's own blocking code (a model call)
    return {"pid": os.getpid(), "held": True}


@app.get("/stream")
def stream() -> Response:
    n = request.args.get("n", 3, type=int)
    interval = request.args.get("interval", 0.05, type=float)

    def events() -> Iterator[str]:
        for k in range(n):
            if k:
                time.sleep(interval)  # a sync worker: this is the user's own blocking code
            yield f"data: {json.dumps({'i': k})}\n\n"
        yield "data: [DONE]\n\n"

    return Response(events(), mimetype="text/event-stream")
