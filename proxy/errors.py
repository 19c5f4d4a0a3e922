"""Lightwire's exception types, and how they reach a client.

::

    LightwireError                      base (store.errors); never raised itself
    ├── ConfigError                     bad settings, raised at start-up
    └── HTTPError                       turned into an OpenAI-shaped error response
        ├── InvalidRequest        400   malformed JSON, missing fields
        ├── Unauthorized          401   wrong or missing client API key
        ├── Forbidden             403   a route that the settings switch off (the admin API without a key)
        ├── NotFound              404   unknown route or target
        ├── PayloadTooLarge       413   body over --max-body-mb
        ├── UpstreamError         502   upstream refused the connection or broke the protocol
        │   └── ProviderError     4xx/5xx  a provider's own error, reached through litellm
        ├── InternalError         500   a bug in Lightwire (the log has the traceback)
        ├── BackendUnavailable    503   no backend ready (starting, restarting)
        ├── StoreError            503   the store cannot write, and its queue stayed full
        └── UpstreamTimeout       504   upstream did not answer in time

Every error body has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so that SDK clients
show the message.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from store.errors import LightwireError


class ConfigError(LightwireError):
    pass


class HTTPError(LightwireError):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
        status: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return json_response(self.body(), status=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as a final server-sent event, for failures after a stream has started."""
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"


class InvalidRequest(HTTPError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(HTTPError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(HTTPError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(HTTPError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(HTTPError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamError(HTTPError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class ProviderError(UpstreamError):
    """A provider's error (its status and message) when it is reached through litellm."""


class InternalError(HTTPError):
    status = 500
    type = "server_error"
    code: str = "internal_error"


class BackendUnavailable(HTTPError):
    status = 503
    type = "server_error"
    code = "backend_unavailable"


class StoreError(HTTPError):
    status = 503
    type = "server_error"
    code = "store_unavailable"


class UpstreamTimeout(HTTPError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, headers=headers, content_type="application/json")
