"""The HTTP shim of the runner contract: ``POST /continue`` and ``GET /health``."""

from __future__ import annotations

import json

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine_service import ErrorKind
from engine_service.api.serving import MAX_DEPTH, telemetry, too_deep
from runner_service._runner import Rejected, Runner, http_status


def _parse(raw: bytes) -> object:
    """The JSON of a /continue body, or a 400 (never a 500) for anything that is not usable JSON."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None  # nested past what the decoder can hold
    except (ValueError, UnicodeDecodeError):
        raise Rejected(
            ErrorKind.INVALID_ARGUMENT, "ERR_INVALID_REQUEST", 'the body must be JSON like {"runId": "..."}'
        ) from None
    if too_deep(doc):
        raise _too_deep()
    return doc


def _too_deep() -> Rejected:
    return Rejected(
        ErrorKind.INVALID_ARGUMENT, "ERR_VALUE_TOO_DEEP", f"the body is nested deeper than {MAX_DEPTH} levels"
    )


def build_app(runner: Runner, max_body_bytes: int) -> Starlette:
    async def read_capped(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_body_bytes):
            raise Rejected(
                ErrorKind.INVALID_ARGUMENT,
                "ERR_BODY_TOO_LARGE",
                f"the body must be at most {max_body_bytes} bytes",
            )
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    raise Rejected(
                        ErrorKind.INVALID_ARGUMENT,
                        "ERR_BODY_TOO_LARGE",
                        f"the body must be at most {max_body_bytes} bytes",
                    )
        except ClientDisconnect:
            # Gone before its body was in (e.g. dropped at the body deadline): nobody reads this
            # answer, but returning one keeps a traceback out of the log.
            raise Rejected(
                ErrorKind.INVALID_ARGUMENT, "ERR_INVALID_REQUEST", "the body did not arrive"
            ) from None
        return bytes(body)

    async def continue_run(request: Request) -> Response:
        if not telemetry.enabled():
            return await _continue_run(request)
        attributes = {"http.request.method": "POST", "http.route": "/continue"}
        kind = telemetry.SpanKind.SERVER
        with telemetry.span(
            "POST /continue", kind=kind, attributes=attributes, carrier=request.headers
        ) as span:
            response = await _continue_run(request)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.record_error(str(response.status_code))
            return response

    async def _continue_run(request: Request) -> Response:
        try:
            presented = runner.check_bearer(request.headers.get("authorization"))
            raw = await read_capped(request)
            doc = _parse(raw)
            if not isinstance(doc, dict) or "runId" not in doc:
                raise Rejected(
                    ErrorKind.INVALID_ARGUMENT,
                    "ERR_INVALID_REQUEST",
                    'the body must be a JSON object with "runId"',
                )
            run_id = await runner.accept(doc["runId"], doc.get("workspaceId"), presented=presented)
        except Rejected as rejected:
            return JSONResponse(
                {"error": rejected.reason, "message": rejected.message},
                status_code=http_status(rejected.kind),
            )
        return JSONResponse({"accepted": True, "runId": run_id}, status_code=202)

    async def health(request: Request) -> Response:
        if not runner.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok", "sandbox": runner.engine.sandbox_status})

    return Starlette(
        routes=[Route("/continue", continue_run, methods=["POST"]), Route("/health", health, methods=["GET"])]
    )
