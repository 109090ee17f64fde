"""The admin REST API (FastAPI). Routes under /hicache need the admin key; /healthz does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as Path_
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import __version__
from ..observe.metrics import ControllerMetrics, RankMetrics, WebhookMetrics, registry_for, render
from .auth import NO_KEY, check_bearer
from .controller import Controller


class SwitchRequest(BaseModel):
    """Switch every rank to a configured member, or attach a new one from a full spec."""

    model_config = ConfigDict(extra="forbid")

    backend: Optional[str] = Field(default=None, description="name of a member to switch to")
    spec: Optional[dict[str, Any]] = Field(default=None, description="a full backend section to attach and switch to")
    force: bool = Field(default=False, description="abandon in-flight calls on the old member; switch ranks present")
    drain_timeout_s: float = Field(default=5.0, ge=0, le=600, description="without force: how long in-flight calls may take")

    @model_validator(mode="after")
    def _one_target(self) -> "SwitchRequest":
        if (self.backend is None) == (self.spec is None):
            raise ValueError("give exactly one of 'backend' or 'spec'")
        return self


class SwitchResult(BaseModel):
    epoch: int
    active: Optional[str]
    ranks: list[int] = []
    missing: list[int] = []


def create_app(controller: Controller, api_key: Optional[str], webhooks=None) -> FastAPI:
    app = FastAPI(title="hicache-ha admin API", version=__version__,
                  description="Switch, attach and detach the HiCache L3 storage backend on every rank.")
    bearer = HTTPBearer(auto_error=False, description="the admin key")

    @app.middleware("http")
    async def admin_only(request: Request, call_next):
        # Before routing and body parsing: an unauthenticated caller learns nothing, not even a 422.
        if request.url.path.startswith("/hicache"):
            if not api_key:
                return JSONResponse({"error": NO_KEY}, status_code=400)
            if not check_bearer(request.headers.get("authorization"), api_key):
                return JSONResponse({"error": "missing or wrong admin key"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    secured = [Depends(bearer)]  # documents the scheme in OpenAPI; the middleware enforces it

    deployment = controller.keys.deployment
    collectors = [RankMetrics(controller.rank_statuses, deployment), ControllerMetrics(controller)]
    if webhooks is not None:
        collectors.append(WebhookMetrics(webhooks, deployment))
    metrics_registry = registry_for(*collectors)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus metrics of every rank (from their heartbeats) and of the controller."""
        return PlainTextResponse(render(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    page = (Path(__file__).with_name("status_page.html")).read_text(encoding="utf-8")

    @app.get("/status", tags=["status"], response_class=HTMLResponse, include_in_schema=False)
    def status_page() -> HTMLResponse:
        """The live status page. The shell is static; it reads the admin API with the admin key."""
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        """The controller process answers (liveness)."""
        return {"ok": True, "leader": controller.is_leader, "ranks_alive": len(controller.alive()),
                "expected_ranks": controller.expected_ranks}

    @app.get("/readyz", tags=["health"], responses={200: {}, 503: {}})
    def readyz(ranks: Optional[Literal["all"]] = Query(
            default=None, description="'all': ready only when every expected rank heartbeats too (for rollout "
                                      "gates; never for the controller's own readiness probe)")):
        """Ready for traffic: this controller leads (else 503). Ranks reach the leader through whatever
        routes on readiness (a Kubernetes Service), so missing ranks are reported here but never make
        the leader unready: that would keep them from ever connecting. ``?ranks=all`` is the operator's
        gate: 200 only when this controller leads and every expected rank heartbeats it."""
        missing = controller.missing()
        leader = controller.is_leader
        ready = leader and (ranks is None or not missing)
        body = {"ready": ready, "leader": leader, "missing_ranks": missing, "expected_ranks": controller.expected_ranks,
                "requires": ["leader", "ranks"] if ranks else ["leader"]}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/hicache/storage-backend", dependencies=secured, tags=["storage"])
    def status() -> dict:
        return controller.status()

    @app.put("/hicache/storage-backend", dependencies=secured, tags=["storage"],
             responses={200: {"model": SwitchResult}, 404: {}, 409: {}, 422: {}, 503: {}})
    def switch(body: SwitchRequest):
        result = controller.switch(body.backend, body.spec, force=body.force, drain_timeout_s=body.drain_timeout_s)
        return JSONResponse(result.body, status_code=result.status)

    @app.delete("/hicache/storage-backend", dependencies=secured, tags=["storage"],
                responses={200: {"model": SwitchResult}, 409: {}, 503: {}})
    def detach(force: bool = False, drain_timeout_s: float = Query(default=5.0, ge=0, le=600)):
        result = controller.detach(force=force, drain_timeout_s=drain_timeout_s)
        return JSONResponse(result.body, status_code=result.status)

    @app.delete("/hicache/storage-backend/members/{name}", dependencies=secured, tags=["storage"],
                responses={200: {}, 404: {}, 409: {}, 503: {}})
    def remove_member(name: str = Path_(pattern=r"^[A-Za-z0-9_.-]{1,64}$")):
        """Remove a member attached over the API from every rank (it must not be active)."""
        result = controller.remove_member(name)
        return JSONResponse(result.body, status_code=result.status)

    @app.get("/hicache/storage-backend/events", dependencies=secured, tags=["storage"])
    def events(limit: int = Query(default=100, ge=1, le=2000)) -> list[dict]:
        return controller.recent_events(limit)

    return app
