"""Errors of the daemon's machine and image calls that the API turns into 4xx.

Each carries the HTTP ``status`` and the ``code`` of the API's error body.
"""

from __future__ import annotations

from ember.errors import EmberError


class ManagerError(EmberError):
    status = 400
    code = "bad_request"


class NotFound(ManagerError):
    status = 404
    code = "not_found"


class Conflict(ManagerError):
    status = 409
    code = "conflict"


class Invalid(ManagerError):
    status = 422
    code = "invalid"
