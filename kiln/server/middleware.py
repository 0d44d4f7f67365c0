"""RequestGuard: the API key and the body size limit, checked before routing or parsing (a plain ASGI
middleware, so a refused request costs no JSON parsing and a huge body is never read whole)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kiln.server.errors import error_response

# Paths that need the API key when one is set: everything that reads the model or its tokenizer (and the
# batch and file routes under /v1 when they land). Left open, as vLLM leaves them: /health, which load
# balancers and orchestrators probe without credentials and which says only "ok"/"draining"; /metrics,
# which Prometheus scrapes without credentials and which holds counts and latencies, no prompts or text
# (put the port behind a network policy where even those are private); the web UI and its static files
# (it asks for the key itself when a request answers 401); and /openapi.json and /docs, the public API shape.
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
UNAUTHORIZED = "invalid or missing API key; send one header 'Authorization: Bearer <key>'"


class RequestGuard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.expected is not None and scope["path"].startswith(PROTECTED_PREFIXES):
            if not self._authorized(scope):
                response = error_response(
                    401, UNAUTHORIZED, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if body is None:
                response = error_response(
                    413,
                    f"the request body is larger than the server's limit of {self.max_body_bytes} bytes",
                    code="request_too_large",
                )
                await response(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(headers) != 1:  # none, or several: which one a proxy or a framework reads differs, so refuse
            return False
        scheme, _, token = headers[0].partition(b" ")
        # compare_digest takes as long whatever the key's first wrong byte: no timing oracle.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected or b"")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the limit (declared or actual)."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the buffered body, then passes on what follows (the disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed
