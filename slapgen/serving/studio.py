"""The web studio's routes: the page itself and the ratings it stores.

    GET  /studio/                the page (HTML, JS, CSS shipped in `slapgen/serving/studio/`; no CDN)
    POST /ratings                a blind pair's verdicts, one per criterion -> 201 with their ids
    GET  /ratings/summary        the served model's ratings, per pair of systems and criterion: win rate,
                                 95% interval, sign test; other models' ratings counted apart
    GET  /ratings.csv            every rating, each with its model, for a spreadsheet

The page is a client of the public HTTP API only (templates, render, adapters, jobs, info, ratings,
campaigns: its Campaigns tab rates `slapgen.serving.campaign_routes` pairs and shows their leaderboard).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from slapgen.errors import SlapgenError
from slapgen.serving.http_errors import error_response, validation_error_body
from slapgen.serving.ratings import RatingStore
from slapgen.serving.requests import RatingRequest

STUDIO_FILES = Path(__file__).with_name("studio_page")


def studio_routes(ratings: RatingStore, served_adapters: Callable[[], list[str]], served_model: Callable[[], str]) -> list:
    """`served_adapters`: the names of the adapters the server serves now (a rating names only those);
    `served_model`: the name of the model it serves (each rating records it, and the summary is of its ratings)."""

    async def add_ratings(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            rating = await run_in_threadpool(RatingRequest.model_validate_json, body or b"{}")  # off the event loop
            rows = rating.rows(await run_in_threadpool(served_adapters))
            ids = await run_in_threadpool(ratings.add, rows, served_model())
        except ValidationError as error:
            return JSONResponse(validation_error_body(error), status_code=400)
        except SlapgenError as error:  # a bad side, or these two videos rated by this rater already (409)
            return error_response(error)
        return JSONResponse({"ids": ids}, status_code=201)

    async def summary(request: Request) -> JSONResponse:
        return JSONResponse(await run_in_threadpool(ratings.summary, served_model()))

    async def export_csv(request: Request) -> Response:
        text = await run_in_threadpool(ratings.csv)
        return Response(text, media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="ratings.csv"'})

    async def to_studio(request: Request) -> Response:
        return RedirectResponse("/studio/", status_code=307)

    if not (STUDIO_FILES / "index.html").is_file():
        raise RuntimeError(f"the studio page is missing from {STUDIO_FILES}")
    return [
        Route("/ratings", add_ratings, methods=["POST"]),
        Route("/ratings/summary", summary, methods=["GET"]),
        Route("/ratings.csv", export_csv, methods=["GET"]),
        Route("/studio", to_studio, methods=["GET"]),
        Mount("/studio", app=StaticFiles(directory=STUDIO_FILES, html=True), name="studio"),
    ]
