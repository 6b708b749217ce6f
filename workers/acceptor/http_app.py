"""The quart-trio application behind the acceptor's HTTP port.

`create_app` wires the route blueprints, maps every error to the JSON error
object, limits request bodies to `server.max_request_body`, and records each
request in the HTTP metrics by route template (never by raw path).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from deeperhub.errors import ProtocolError
from deeperhub.ipc import RemoteError
from deeperhub.metrics import CONTENT_TYPE_LATEST, HTTP_DURATION, HTTP_REQUESTS
from deeperhub.validation import ValidationError

from .http_auth import create_auth_blueprint
from .http_channels import create_channels_blueprint
from .http_retention import create_retention_blueprint
from .http_security import register_security_hooks
from .http_support import Api, ApiError, error_body, remote_error_response
from .metrics_endpoint import render_scrape

if TYPE_CHECKING:
    from .services import Services

__all__ = ["HEALTH_TIMEOUT", "UNMATCHED_ROUTE", "create_app"]

# Seconds /health waits for the supervisor's status reply.
HEALTH_TIMEOUT = 2.0
UNMATCHED_ROUTE = "unmatched"
# Metric label for methods outside this set, so a client cannot create series.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

log = logging.getLogger("deeperhub.acceptor.http")


def create_app(services: Services) -> QuartTrio:
    """Return the HTTP API application of one acceptor process."""
    app = QuartTrio("deeperhub.acceptor")
    app.config["MAX_CONTENT_LENGTH"] = services.settings["server.max_request_body"]
    # Error handlers below turn every exception into a JSON response, also in
    # tests (where Quart would otherwise re-raise it).
    app.config["PROPAGATE_EXCEPTIONS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]

    api = Api(services)
    app.register_blueprint(create_auth_blueprint(api))
    app.register_blueprint(create_channels_blueprint(api))
    app.register_blueprint(create_retention_blueprint(api))
    _register_error_handlers(app)
    _register_metrics_hooks(app)
    if services.security is not None:
        register_security_hooks(app, services.security)
    _register_operations_routes(app, services)
    return app


def _register_error_handlers(app: QuartTrio) -> None:
    @app.errorhandler(ApiError)
    async def handle_api_error(exc: ApiError) -> Any:
        return exc.body(), exc.status, exc.headers

    @app.errorhandler(ValidationError)
    async def handle_validation_error(exc: ValidationError) -> Any:
        return error_body("validation_failed", exc.message, exc.field), 422

    @app.errorhandler(RemoteError)
    async def handle_remote_error(exc: RemoteError) -> Any:
        error = remote_error_response(exc)
        return error.body(), error.status

    @app.errorhandler(HTTPException)
    async def handle_http_exception(exc: HTTPException) -> Any:
        return _http_exception_response(exc)

    @app.errorhandler(Exception)
    async def handle_unexpected(exc: Exception) -> Any:
        log.error(
            "unhandled error in %s %s",
            request.method,
            _route_label(),
            exc_info=exc,
        )
        return error_body("internal_error", "internal server error"), 500


def _http_exception_response(exc: HTTPException) -> Any:
    status = exc.code or 500
    headers: dict[str, str] = {}
    if status == 404:
        code, message = "not_found", "no route matches this path"
    elif status == 405:
        code = "method_not_allowed"
        message = f"method {request.method} is not allowed on this path"
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(sorted(exc.valid_methods))
    elif status == 413:
        limit = request.max_content_length
        code = "payload_too_large"
        message = f"request body exceeds the maximum of {limit} bytes"
    else:
        # Werkzeug's name, e.g. "Request Timeout" becomes "request_timeout".
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or code
    return error_body(code, message), status, headers


def _route_label() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED_ROUTE


def _register_metrics_hooks(app: QuartTrio) -> None:
    @app.before_request
    async def start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    async def count_request(response: Response) -> Response:
        method = request.method if request.method in _KNOWN_METHODS else "other"
        route = _route_label()
        started = g.get("request_started")
        HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
        if started is not None:
            HTTP_DURATION.labels(method, route).observe(time.perf_counter() - started)
        return response


def _register_operations_routes(app: QuartTrio, services: Services) -> None:
    @app.get("/health")
    async def health() -> Any:
        workers, reachable = await _worker_states(services)
        healthy = reachable and all(
            isinstance(worker, dict) and worker.get("state") == "running"
            for worker in workers.values()
        )
        # The RPC client does not reconnect, so once the DB writer connection
        # is lost every write of this acceptor fails until it restarts.
        if services.db.closed:
            log.warning("health check: connection to the DB writer is closed")
            healthy = False
        body = {"status": "ok" if healthy else "degraded", "workers": workers}
        return body, 200 if healthy else 503

    @app.get("/metrics")
    async def metrics() -> Any:
        if not services.settings["metrics.enabled"]:
            raise NotFound()
        body = await render_scrape(services)
        return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)


async def _worker_states(services: Services) -> tuple[dict[str, Any], bool]:
    """Return the supervisor's worker table and whether the supervisor replied."""
    this_worker = {"state": "running", "pid": os.getpid(), "restarts": 0}
    if services.supervisor is None:
        return {services.worker_id: this_worker}, True

    try:
        status = await services.supervisor.call("status", timeout=HEALTH_TIMEOUT)
    except trio.TooSlowError:
        log.warning("supervisor status request timed out after %g s", HEALTH_TIMEOUT)
    except (
        trio.BrokenResourceError,
        trio.ClosedResourceError,
        ProtocolError,
        RemoteError,
    ) as exc:
        log.warning("supervisor status request failed: %s", exc)
    else:
        workers = status.get("workers") if isinstance(status, dict) else None
        if isinstance(workers, dict):
            return workers, True
        log.warning("supervisor status reply has no workers table: %r", status)

    unreachable = {"state": "unreachable", "pid": None, "restarts": None}
    return {"supervisor": unreachable, services.worker_id: this_worker}, False
