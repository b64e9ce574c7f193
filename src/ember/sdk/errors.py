"""The SDK's exceptions: every API error is an :class:`APIError` carrying the API's message.

    EmberError (ember.errors)
     ├── APIError            the daemon answered 4xx/5xx (status, code, message)
     │    ├── InvalidRequest 400 / 422: malformed or out-of-range request
     │    ├── Unauthorized   401: missing or wrong bearer token (TCP)
     │    ├── NotFound       404: no such machine, image or guest path
     │    └── Conflict       409: wrong state, name taken, image in use, port in use
     └── DaemonUnavailable   the daemon did not answer (no socket, refused, timed out)
"""

from __future__ import annotations

import json

from ember.errors import EmberError


class APIError(EmberError):
    """The daemon refused a request; ``str()`` is the API's one-line message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, " \
               f"message={self.message!r})"


class InvalidRequest(APIError):
    """400 or 422: the request is malformed or a value is out of range."""


class Unauthorized(APIError):
    """401: the TCP listener wants ``Authorization: Bearer <token>`` (EMBER_TOKEN)."""


class NotFound(APIError):
    """404: no such machine, image or guest path."""


class Conflict(APIError):
    """409: the machine is in the wrong state, a name is taken, an image or port is in use."""


class DaemonUnavailable(EmberError):
    """The daemon could not be reached (or stopped answering)."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest, 401: Unauthorized, 404: NotFound, 409: Conflict, 422: InvalidRequest,
}


def error_for(status: int, code: str, message: str) -> APIError:
    return _BY_STATUS.get(status, APIError)(status, code, message)


def api_error(status: int, body: bytes) -> APIError:
    """The exception for a 4xx/5xx answer, carrying the API's own message."""
    try:
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code = "error"
        text = body.decode(errors="replace").strip().splitlines()
        message = text[0][:500] if text else f"the daemon answered HTTP {status}"
    return error_for(status, code, message)
