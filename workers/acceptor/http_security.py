"""The security gate's hooks in the HTTP app: before and after each request.

Before a route runs: resolve the client IP, reject blocked IPs (403) and those
over the rate limit (429 with `Retry-After`), then apply the payload rules to
the raw path, query string, headers and JSON body (400). `/health` and
`/metrics` are exempt from the rate limit, so monitoring cannot exhaust it.

After the response: report 404s, failed logins (401 on the login route) and
bodies over the size limit (413) to the security monitor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import g, request

from deeperhub.security.anomaly import LOGIN_FAILED, NOT_FOUND
from deeperhub.security.rules import BODY_TOO_LARGE, Match

from .security_gate import HTTP

if TYPE_CHECKING:
    from quart import Response
    from quart_trio import QuartTrio

    from .security_gate import Rejection, SecurityGate

__all__ = ["LOGIN_ROUTE", "RATE_LIMIT_EXEMPT", "register_security_hooks"]

LOGIN_ROUTE = "/api/auth/login"
RATE_LIMIT_EXEMPT = frozenset({"/health", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _response(rejection: Rejection) -> Any:
    return rejection.body(), rejection.status, rejection.headers()


def register_security_hooks(app: QuartTrio, gate: SecurityGate) -> None:
    """Add the gate's before- and after-request hooks to `app`."""

    @app.before_request
    async def screen_request() -> Any:
        peer = request.remote_addr or ""
        headers = list(request.headers.items())
        ip = gate.client_ip(peer, headers)
        g.client_ip = ip

        exempt = request.path in RATE_LIMIT_EXEMPT
        rejection = gate.check_access(ip, HTTP, rate_limited=not exempt)
        if rejection is not None:
            return _response(rejection)

        raw_path = request.scope.get("raw_path") or request.path.encode()
        query = request.scope.get("query_string") or b""
        rejection = gate.inspect_request(
            ip, raw_path.decode("latin-1"), query.decode("latin-1"), headers
        )
        if rejection is None and request.method in _BODY_METHODS:
            # A body over the size limit raises 413 here, reported below.
            data = await request.get_data(cache=True, as_text=False)
            assert isinstance(data, bytes)
            rejection = gate.inspect_json_body(ip, request.path, data)
        if rejection is not None:
            return _response(rejection)
        return None

    @app.after_request
    async def report_response(response: Response) -> Response:
        ip = g.get("client_ip")
        if ip is None:
            return response
        status = response.status_code
        if status == 404:
            gate.report(NOT_FOUND, ip, path=request.path[:256])
        elif status == 401 and request.path == LOGIN_ROUTE:
            gate.report(LOGIN_FAILED, ip)
        elif status == 413:
            gate.reject_payload(ip, Match(BODY_TOO_LARGE, "body"), request.path)
        return response
