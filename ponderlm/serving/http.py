"""What bounds a client at the HTTP layer, before a request reaches the API: the request line and
headers (size and time, in uvicorn's protocol), the body (size and time), the API key, and the
answers for what is refused (OpenAI's error shape where the app is reached, a plain response where
it is not)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import sys
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ponderlm.serving.page import asks_for_login
from ponderlm.serving.protocol import ApiError, error_body, validation_message

MAX_BODY_BYTES = 4 << 20  # --max-body-bytes default (docs/SERVING.md, "Limits")


REQUEST_TIMEOUT = 30.0  # --request-timeout default: seconds to receive a request's head, and again its body


MAX_HEAD_BYTES = 32 << 10  # the request line and headers of one request; beyond: 431 and the connection closed


class _TooLarge(Exception):
    pass


async def _read_body(receive, cap: int, timeout: float) -> bytes | None:
    """The request's body, read up to ``cap`` bytes within ``timeout`` seconds: _TooLarge past the
    cap (nothing after it is read: the connection is closed), TimeoutError past the time, None if
    the client went away. Chunked bodies (no Content-Length) are counted the same way."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    chunks, size = [], 0
    while True:
        msg = await asyncio.wait_for(receive(), max(0.0, end - loop.time()))  # TimeoutError past the end
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _TooLarge
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def key_matches(authorization: bytes, key: bytes) -> bool:
    """Whether an ``Authorization`` header carries the API key: ``Bearer KEY``, or ``Basic`` with
    base64(any-user:KEY), which a browser sends once its login prompt was answered (the page, and
    the page's own requests). Compared in constant time."""
    scheme, _, cred = authorization.strip().partition(b" ")
    scheme, cred = scheme.lower(), cred.strip()
    if scheme == b"bearer":
        return hmac.compare_digest(cred, key)
    if scheme != b"basic":
        return False
    try:
        user_pass = base64.b64decode(cred, validate=True)
    except (binascii.Error, ValueError):
        return False
    _, colon, password = user_pass.partition(b":")
    return bool(colon) and hmac.compare_digest(password, key)


class _AuthAndCount:
    """Pure ASGI middleware: the API key check, the bounded body read, the request count by path
    and status, and the last resort for unexpected exceptions (a 500 in OpenAI's shape and one line
    on stderr, never a traceback). (Not Starlette's BaseHTTPMiddleware, which passes every streamed
    chunk through an extra stream.)"""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, request_timeout: float,
                 count: Callable[[str, int], None]) -> None:  # fmt: skip
        self.app, self.api_key, self.count = app, api_key, count
        self.key = api_key.encode() if api_key is not None else None
        self.max_body_bytes, self.request_timeout = max_body_bytes, request_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.key is not None and not key_matches(dict(scope["headers"]).get(b"authorization", b""), self.key):
            self.count(path, 401)
            return await self.refuse_key(path)(scope, receive, send)
        status = []

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            replay = await self.bounded_body(scope, receive, send_counted)
            if replay is not None:
                await self.app(scope, replay, send_counted)
            elif not status:  # the client went away before its body arrived (nginx's 499)
                status.append(499)
        except Exception as e:  # a bug: this request fails in OpenAI's shape, the server goes on
            print(f"error: {scope.get('method', '')} {path} failed: {_one_line(e)}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):  # the client may be gone too
                if not status:
                    body = error_body("the server failed on this request (an internal error; it is logged)",
                                      "server_error", code="internal_error")  # fmt: skip
                    await JSONResponse(body, status_code=500)(scope, receive, send_counted)
                else:  # the response started: end it
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.count(path, status[0] if status else 500)

    @staticmethod
    def refuse_key(path: str):
        """The 401 of a request without the key: for the page (a browser's navigation), a Basic
        challenge, so that the browser asks for it (the key as the password, any user name); for the
        API, OpenAI's error shape."""
        if asks_for_login(path):
            text = "This page needs the server's API key: give it as the password (any user name).\n"
            challenge = 'Basic realm="ponderlm", charset="UTF-8"'
            return PlainTextResponse(text, status_code=401, headers={"WWW-Authenticate": challenge,
                                                                     "Cache-Control": "no-store"})  # fmt: skip
        body = error_body("missing or wrong API key (Authorization: Bearer KEY)", "invalid_request_error",
                          code="invalid_api_key")  # fmt: skip
        return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="ponderlm"'})

    async def bounded_body(self, scope, receive, send):
        """Read the body within the limits: a ``receive`` that gives it to the app (then passes the
        server's messages on: the disconnect), or None once the request was refused (413, 408) or
        its client went away."""
        s = self

        async def refuse(code: int, message: str, err: str) -> None:
            body = error_body(message, "invalid_request_error", code=err)
            # Connection: close, so that the rest of the body is never read
            await JSONResponse(body, status_code=code, headers={"Connection": "close"})(scope, receive, send)

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > s.max_body_bytes:
            return await refuse(413, f"the request body is {int(declared)} bytes; this server takes at most "
                                     f"{s.max_body_bytes} (--max-body-bytes)", "request_too_large")  # fmt: skip
        try:
            body = await _read_body(receive, s.max_body_bytes, s.request_timeout)
        except _TooLarge:
            return await refuse(413, f"the request body is larger than {s.max_body_bytes} bytes, the most this "
                                     f"server takes (--max-body-bytes)", "request_too_large")  # fmt: skip
        except asyncio.TimeoutError:
            return await refuse(408, f"the request body did not arrive within {s.request_timeout:g} seconds "
                                     f"(--request-timeout)", "request_timeout")  # fmt: skip
        if body is None:  # the client went away before its body arrived
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


def guard(app: FastAPI, api_key: str | None, max_body_bytes: int, request_timeout: float,
          count: Callable[[str, int], None]) -> None:  # fmt: skip
    """The API key check, the bounded body, request counting (``count(path, status)``), and every
    error in OpenAI's shape."""
    app.add_middleware(_AuthAndCount, api_key=api_key, max_body_bytes=max_body_bytes,
                       request_timeout=request_timeout, count=count)  # fmt: skip

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        body = error_body(exc.message, exc.kind, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)


def _plain_answer(transport, status: int, reason: str, message: str, code: str) -> None:
    """An error in OpenAI's shape written straight to a connection, which is then closed."""
    body = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode()  # fmt: skip
    transport.write(head + body)
    transport.close()


class _BoundedHead:
    """Mixed into uvicorn's HTTP/1.1 protocol (httptools) by :func:`bounded_protocol`: the request's
    head bounded where it is read."""

    timeout: float
    max_head: int
    in_head, head_bytes, head_timer, refused = True, 0, None, False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.arm()

    def connection_lost(self, exc) -> None:
        self.disarm()
        super().connection_lost(exc)

    def arm(self) -> None:
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.timeout, self.head_too_slow)

    def disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_too_slow(self) -> None:
        self.head_timer = None
        if self.in_head and not self.transport.is_closing():
            self.refuse(408, "Request Timeout", f"the request's headers did not arrive within {self.timeout:g} "
                                                f"seconds (--request-timeout)", "request_timeout")  # fmt: skip

    def refuse(self, status: int, reason: str, message: str, code: str) -> None:
        self.refused = True
        _plain_answer(self.transport, status, reason, message, code)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.in_head and self.head_bytes + len(data) > self.max_head:  # feed up to the bound, then look
            room = self.max_head - self.head_bytes
            self.head_bytes = self.max_head
            super().data_received(data[:room])
            if self.in_head and not self.refused and not self.transport.is_closing():
                self.refuse(431, "Request Header Fields Too Large", f"the request's line and headers are larger "
                            f"than {self.max_head} bytes", "headers_too_large")  # fmt: skip
                return
            data = data[room:]
        elif self.in_head:
            self.head_bytes += len(data)
        if data and not self.refused:
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.arm()

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0  # what follows is the next request's head


def bounded_protocol(timeout: float, max_head: int = MAX_HEAD_BYTES) -> type:
    """uvicorn's HTTP/1.1 protocol (httptools), with the request's head bounded where it is read:
    at most ``max_head`` bytes of request line and headers (431 beyond; httptools itself gathers a
    header of any length), received within ``timeout`` seconds of the connection or of the
    request's first byte (408 then; uvicorn waits for a slow head forever). Both answer in OpenAI's
    shape and close the connection. The body's bounds are the app's (:class:`_AuthAndCount`)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("BoundedHttpToolsProtocol", (_BoundedHead, HttpToolsProtocol), {"timeout": timeout,
                                                                              "max_head": max_head})  # fmt: skip
