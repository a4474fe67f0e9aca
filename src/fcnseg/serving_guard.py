"""Hardening of MLflow's scoring server (``mlflow models serve``) for fcnseg's models, torch-free.

MLflow 3.17's server reads any body size, answers an exception raised by ``predict`` with a generic ``message``
and the server's traceback in ``stack_trace``, and prefixes an ``MlflowException``'s message with the whole input
DataFrame (``Failed to predict data '…'``); a JSON parse error can quote the body back. :class:`RequestGuard`, an
ASGI middleware, sits in front of it:

- a body over ``max_request_bytes`` ends in a 413 before it is read further (Content-Length, or counted);
- every error answer (status ≥ 400) becomes ``{"error_code": …, "message": <one line>}``: fcnseg's line without
  MLflow's input quote, no ``stack_trace``, absolute paths masked, at most ``MAX_ERROR_BYTES``.

Both models' ``load_context`` call :func:`install` (a no-op outside the scoring server): MLflow's ``app.py`` loads
the model first and builds the app after, so the guard can be put around that app (see :func:`install`).
"""

from __future__ import annotations

import json
import re
import sys

MAX_ERROR_BYTES = 64 * 1024
MESSAGE_CHARS = 2000  # the one line, cut: room for several rows' errors, far below MAX_ERROR_BYTES
_DRAIN_AT_MOST = 16  # times the limit: an oversized body is read and dropped up to this, then the answer goes
_READ_AT_MOST = 256 * 1024  # of an error body MLflow made: the rest is the quoted input
_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.@+-]+/)+[\w.@+-]*")  # /abs/path/like/this, not a URL
_SCORING_APP = "mlflow.pyfunc.scoring_server.app"  # the module `mlflow models serve` runs under uvicorn


def error_message(body: bytes, status: int) -> tuple[str, str]:
    """(error_code, one-line message) from an error answer's body (MLflow's JSON or plain text)."""
    text = body[:_READ_AT_MOST].decode("utf-8", errors="replace")
    code = {413: "REQUEST_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 504: "TIMEOUT"}.get(status, "BAD_REQUEST")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "message" in parsed:
        text, code = str(parsed["message"]), str(parsed.get("error_code") or code)
    # MLflow prefixes a predict error with the input: "Failed to predict data '<DataFrame>'. \nError: <ours>"
    if text.startswith("Failed to predict data") and "\nError: " in text:
        text = text.rsplit("\nError: ", 1)[1]
    first = " ".join(text.split("Traceback (most recent call last)")[0].split())
    first = _PATH.sub("<path>", first) or f"HTTP {status}"
    return code, first if len(first) <= MESSAGE_CHARS else first[: MESSAGE_CHARS - 3] + "..."


class RequestGuard:
    """ASGI middleware: request-size limit and bounded one-line error answers (see the module docstring)."""

    def __init__(self, app, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def _answer(self, send, status: int, code: str, message: str) -> None:
        body = json.dumps({"error_code": code, "message": message}).encode()[:MAX_ERROR_BYTES]
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self, size: int | None) -> str:
        said = f"{size:,} bytes" if size is not None else "more"
        return (f"request body is {said}, over this server's limit of {self.max_request_bytes:,} bytes "
                f"($FCNSEG_MAX_REQUEST_MB); send fewer or smaller images per request")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        declared = int(length) if length is not None and length.isdigit() else None
        chunks, size, more = [], 0, True
        while more:  # read it all here, counting: a chunked body has no Content-Length to trust
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_request_bytes or (declared or 0) > self.max_request_bytes:
                chunks = []  # kept no further; the rest is read and dropped (up to a bound), so the client, still
                if size > _DRAIN_AT_MOST * self.max_request_bytes:  # sending, gets the answer, not a broken pipe
                    more = False
                continue
            chunks.append(chunk)
        if size > self.max_request_bytes or (declared or 0) > self.max_request_bytes:
            await self._answer(send, 413, "REQUEST_TOO_LARGE", self._too_large(declared or size))
            return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        error_status, error_body = None, bytearray()

        async def shape(message) -> None:
            nonlocal error_status
            if message["type"] == "http.response.start" and message["status"] >= 400:
                error_status = message["status"]
                return
            if message["type"] == "http.response.body" and error_status is not None:
                if len(error_body) < _READ_AT_MOST:
                    error_body.extend(message.get("body", b"")[: _READ_AT_MOST - len(error_body)])
                if not message.get("more_body", False):
                    code, text = error_message(bytes(error_body), error_status)
                    await self._answer(send, error_status, code, text)
                return
            await send(message)

        await self.app(scope, replay, shape)


def install(max_request_bytes: int) -> bool:
    """Puts :class:`RequestGuard` in front of the app MLflow's scoring server is about to build; True when called
    while MLflow's ``scoring_server/app.py`` runs (``app = scoring_server.init(load_model(...))``), else a no-op.

    ``init`` was looked up before the model loaded, so it cannot be wrapped; the ``FastAPI`` class it imports when
    it runs can: the next app made becomes one whose middleware stack sits inside the guard, and the class is put
    back at once.
    """
    module = sys.modules.get(_SCORING_APP)
    if module is None or hasattr(module, "app"):
        return False
    import fastapi

    original = fastapi.FastAPI

    class GuardedFastAPI(original):
        def __init__(self, *args, **kwargs) -> None:
            fastapi.FastAPI = original  # one app only
            super().__init__(*args, **kwargs)

        def build_middleware_stack(self):
            return RequestGuard(super().build_middleware_stack(), max_request_bytes)

    fastapi.FastAPI = GuardedFastAPI
    return True
