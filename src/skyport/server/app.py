"""The ASGI app factory: builds the core, wires the routers, turns errors into clear replies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

import skyport
from skyport.server.api import agent, ops, ports, swm, tes, tokens, v1
from skyport.server.auth import AuthError
from skyport.server.clock import Clock
from skyport.server.core import Core
from skyport.server.intake import SubmissionError
from skyport.server.settings import Settings
from skyport.server.tes.callbacks import CallbackLoop, core_key
from skyport.server.tes.service import TesService


def create_app(settings: Settings, *, clock: Clock | None = None) -> FastAPI:
    core = Core(settings, clock)
    # GA4GH TES: the service over the core, and the loop that delivers its callback_url POSTs.
    callbacks = CallbackLoop(
        core.store, core.clock, core_key(settings.home), interval_s=settings.scheduler_interval_s
    )
    tes_service = TesService(core, on_callback_task=callbacks.ring)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await core.start()
        callback_task = asyncio.create_task(callbacks.run(), name="tes-callbacks")
        try:
            yield
        finally:
            callback_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await callback_task
            await core.stop()

    app = FastAPI(
        title="Sky Port",
        version=skyport.__version__,
        summary="One authenticated API between the software that produces work and the machines that run it.",
        lifespan=lifespan,
        # Sky Port's own metrics are its Prometheus /metrics. FastAPI's native OpenTelemetry looks for
        # configured providers on every request (~9 us each, a submission is ~700), for nothing here.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.core = core
    app.state.tes = tes_service
    app.include_router(v1.router)
    app.include_router(tokens.router)
    app.include_router(tes.router)
    app.include_router(swm.router)
    app.include_router(ops.router)
    app.include_router(agent.router)
    app.include_router(ports.router)

    @app.exception_handler(AuthError)
    async def _auth_error(_: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(SubmissionError)
    async def _submission_error(_: Request, exc: SubmissionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(
            {"detail": "\n".join(lines), "errors": jsonable_encoder(exc.errors())}, status_code=400
        )

    return app
