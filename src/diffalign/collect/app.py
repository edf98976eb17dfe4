"""The collection server: FastAPI routes over the queue, behind tokens and request limits.

Pages (`GET /annotate?token=...`, `GET /admin?token=...`) are plain HTML with inline JavaScript; the
script calls the JSON API with the token in an `Authorization: Bearer` header. Every route needs a
token: none or an unknown one is 401, a rater's token on an admin route or another rater's pair is 403.
"""

import html
import logging
import secrets
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.types import ASGIApp

from diffalign.collect import queue, report, tokens
from diffalign.collect.limits import BodySizeLimit, RateLimiter
from diffalign.collect.storage import read_connection
from diffalign.prefs.store import PreferenceStore, StoreError

_log = logging.getLogger(__name__)
_MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns on PostgreSQL


@dataclass
class ServerConfig:
    """Limits of the collection server.

    Attributes:
        max_body_bytes: largest request body accepted; larger ones get 413 (a vote is under 200 bytes).
        rate_per_s: requests per second allowed per token, on average (429 with Retry-After beyond it).
        burst: requests a token may make at once before the rate applies.
    """

    max_body_bytes: int = 16 * 1024
    rate_per_s: float = 20.0
    burst: int = 40


class VoteIn(BaseModel):
    """A vote: which pair, what was chosen, and the client's idempotency key for this answer."""

    model_config = ConfigDict(extra="forbid")
    # Strict: "7" or true is not an id (a client sending them has a bug worth hearing about).
    assignment_id: int = Field(gt=0, le=_MAX_ID, strict=True)
    vote: Literal["left", "right", "tie", "skip"]
    idempotency_key: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")


def _page(name: str, **values: str) -> str:
    text = resources.files("diffalign.collect").joinpath("pages", name).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace(f"__{key.upper()}__", value)
    return text


def _json_body(request: Request) -> None:
    """Refuse (415) a body that is not declared as JSON, instead of a 422 that blames its fields."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        shown = f"Content-Type {media!r}" if media else "no Content-Type"
        raise HTTPException(415, f"send the body as JSON with Content-Type: application/json (got {shown})")


def _validation_errors(errors: list[dict]) -> list[dict]:
    """Pydantic's errors without the offending input: it is the client's own data (up to the body limit),
    and a NaN or Infinity in it would make the 422 itself fail to encode as JSON."""
    return [{k: v for k, v in error.items() if k in ("type", "loc", "msg")} for error in errors]


def _security_headers(response: Response, nonce: str | None = None) -> None:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src {script}; style-src 'unsafe-inline'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"  # page URLs carry the token
    response.headers["Cache-Control"] = "no-store"


def create_app(store: PreferenceStore, config: ServerConfig | None = None) -> ASGIApp:
    """The app serving `store` (opened with `storage.open_store`, so the collection tables exist): the
    FastAPI routes wrapped in the body-size limit."""
    config = config or ServerConfig()
    limiter = RateLimiter(config.rate_per_s, config.burst)
    app = FastAPI(title="diffalign collect", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        if "Content-Security-Policy" not in response.headers:
            _security_headers(response)
        return response

    def principal(request: Request, token: Annotated[str | None, Query(max_length=200)] = None):
        """The caller, from `Authorization: Bearer <token>` or (pages, images) `?token=`."""
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise HTTPException(401, "Authorization must be 'Bearer <token>'")
            token = value.strip()
        if not token:
            raise HTTPException(401, "a token is required", headers={"WWW-Authenticate": "Bearer"})
        wait = limiter.allow(tokens.hash_token(token))
        if wait:
            raise HTTPException(429, "too many requests", headers={"Retry-After": str(max(1, round(wait)))})
        with read_connection(store) as conn:
            who = tokens.resolve(conn, token)
        if who is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return who

    Who = Annotated[tokens.Principal, Depends(principal)]

    def rater(who: Who) -> tokens.Principal:
        if who.is_admin:
            raise HTTPException(403, "this is a rater's route; use a rater token")
        return who

    def admin(who: Who) -> tokens.Principal:
        if not who.is_admin:
            raise HTTPException(403, "admin token required")
        return who

    Rater = Annotated[tokens.Principal, Depends(rater)]
    Admin = Annotated[tokens.Principal, Depends(admin)]

    def _progress(rater_id: int) -> dict:
        p = queue.progress(store, rater_id)
        return {"answered": p.answered, "remaining": p.remaining, "total": p.total}

    @app.get("/annotate", response_class=HTMLResponse)
    def annotate_page(who: Rater) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        response = HTMLResponse(_page("annotate.html", nonce=nonce, rater=html.escape(who.rater_name or "")))
        _security_headers(response, nonce)
        return response

    @app.get("/admin", response_class=HTMLResponse)
    def admin_page(_: Admin) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        response = HTMLResponse(_page("admin.html", nonce=nonce))
        _security_headers(response, nonce)
        return response

    @app.get("/api/next")
    def next_pair(who: Rater) -> dict:
        shown = queue.next_pair(store, who.rater_id)
        body: dict = {"progress": _progress(who.rater_id), "rater": who.rater_name}
        if shown is None:
            return {**body, "done": True}
        return {
            **body,
            "done": False,
            "assignment_id": shown.assignment_id,
            "prompt": shown.prompt,
            "left": f"/api/images/{shown.left}",
            "right": f"/api/images/{shown.right}",
        }

    @app.post("/api/vote")
    def vote(body: VoteIn, who: Rater, _: Annotated[None, Depends(_json_body)]) -> dict:
        try:
            status = queue.record_vote(
                store, who.rater_id, body.assignment_id, body.vote, body.idempotency_key
            )
        except queue.QueueError as err:
            raise HTTPException(err.status, str(err)) from err
        return {"status": status}

    @app.get("/api/images/{sha256}")
    def image(sha256: str, who: Who) -> Response:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise HTTPException(404, "no such image")
        if not who.is_admin and not queue.may_see_image(store, who.rater_id, sha256):
            raise HTTPException(403, "this image is not in your queue")
        try:
            info = store.image_info(sha256)
            data = store.image_bytes(sha256)
        except KeyError as err:
            raise HTTPException(404, "no such image") from err
        return Response(data, media_type=f"image/{info.format.lower()}")

    @app.get("/api/admin/overview")
    def overview(_: Admin) -> dict:
        return report.overview(store)

    @app.get("/api/admin/export")
    def export(_: Admin) -> FileResponse:
        from diffalign.prefs.formats import export_format

        folder = Path(tempfile.mkdtemp(prefix="diffalign-export-"))
        out = folder / "collect.parquet"
        try:
            export_format("parquet", store, out, source=queue.SOURCE)
        except BaseException:
            _remove_tree(folder)  # the background task that would remove it only runs after a response
            raise
        return FileResponse(
            out,
            media_type="application/vnd.apache.parquet",
            filename="collect.parquet",
            background=BackgroundTask(_remove_tree, folder),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_errors(list(err.errors()))}, status_code=422)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, err: StoreError) -> JSONResponse:
        # A damaged store (an image file deleted or changed on disk): the server's fault, said plainly,
        # with the details (paths) in the server's log rather than in the answer.
        _log.error("collect: %s", err)
        detail = "the preference store could not serve this (an image file missing or changed on disk?)"
        return JSONResponse({"detail": f"{detail}; the server log has the details"}, status_code=500)

    @app.exception_handler(queue.QueueError)
    async def queue_error(_: Request, err: queue.QueueError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    return BodySizeLimit(app, config.max_body_bytes)


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
