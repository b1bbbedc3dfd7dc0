"""The routes of rating campaigns (`slapgen.campaign_store`): raters judge blind pairs of videos that
already exist, so nobody waits for a generation.

    GET  /campaigns                              every campaign, with its progress
    GET  /campaigns/{name}/pair?rater=R          the next blind pair for R: pair_id, prompt, left/right video URLs
    GET  /campaigns/{name}/videos/{token}.mp4    a video of the campaign (only files the store names)
    POST /campaigns/{name}/ratings               {"pair_id", "rater", "verdicts": {criterion: left|right|tie}}
    GET  /campaigns/{name}/leaderboard           per criterion: strengths, intervals, ranks, done and why,
                                                 rater agreement, which automatic metric tracks the raters,
                                                 once done the winner and its LoRA file
    GET  /campaigns/{name}/verdicts(.csv)        every verdict: who, when, which systems were shown

Storage and statistics run in a worker thread, never on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import ConfigDict, Field, StringConstraints, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, MalformedRangeHeader, Response
from starlette.routing import Route

from slapgen.errors import SlapgenError
from slapgen.evaluation.ranking import OUTCOMES
from slapgen.campaign_store import (REPEAT_SHARE, CampaignStore, IssuedPair, next_pair_for, prompt_count,
                                   verdicts_of)
from slapgen.serving.http_errors import error_response, validation_error_body
from slapgen.serving.requests import RequestBody

Rater = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]


class RaterQuery(RequestBody):
    model_config = ConfigDict(extra="ignore")
    rater: Rater = Field(description="who rates: any name up to 64 characters, the same on every visit")


class CampaignVerdictRequest(RequestBody):
    """A rater's verdicts on one issued pair, one per criterion of the campaign."""

    model_config = ConfigDict(extra="forbid")
    pair_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    rater: Rater
    verdicts: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], Literal[OUTCOMES]] = Field(
        min_length=1, description="criterion -> left, right or tie")


class WholeFileOnBadRange(FileResponse):
    """A file answer that reads a malformed `Range` header (`bytes=5-1`, `items=0-5`, `bytes=`) as none: the whole file,
    200, as RFC 9110 (14.2) has a server do; Starlette answered 400 with its own plain-text sentence. A range past
    the end is still 416."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []  # Starlette's own answer for too many ranges: the whole file


def campaign_routes(store: CampaignStore, repeat_share: float = REPEAT_SHARE) -> list:
    """The routes over `store`; `repeat_share` is the share of pairs that repeat one the rater answered. A test
    that counts ratings passes 0: a repeat is not a rating, and one came at random in 5% of its pairs."""
    def video_url(name: str, token: str) -> str:
        return f"/campaigns/{name}/videos/{token}.mp4"

    def pair_body(name: str, pair: IssuedPair) -> dict:
        campaign = store.get(name)
        item = campaign.items[pair.item]
        return {"campaign": name, "pair_id": pair.pair_id, "rater": pair.rater, "prompt": item.prompt,
                "prompt_index": item.prompt_index, "seed": item.seed, "criteria": campaign.criteria,
                "choices": list(OUTCOMES), "left": {"video": video_url(name, pair.left_video)},
                "right": {"video": video_url(name, pair.right_video)}}

    def next_pair(name: str, rater: str) -> dict:
        pair = next_pair_for(store, name, rater, np.random.default_rng(), repeat_share)
        if isinstance(pair, str):  # none: why
            return {"campaign": name, "pair_id": None, "rater": rater, "message": pair}
        return pair_body(name, pair)

    def leaderboard(name: str) -> dict:
        from slapgen.evaluation.leaderboard import criterion_board

        campaign = store.get(name)
        rows = store.verdicts(name)
        video_scores = {metric: {(system, str(campaign.items[item].prompt_index), campaign.items[item].seed): value
                                 for (system, item), value in values.items()}
                        for metric, values in campaign.video_scores.items()}
        criteria = {}
        for criterion in campaign.criteria:
            ranked = verdicts_of(rows, criterion)
            repeats = verdicts_of([row for row in rows if row["repeat"]], criterion, repeats=True)
            criteria[criterion] = criterion_board(ranked, repeats, campaign.systems, campaign.budget,
                                                  campaign.metric_directions, campaign.system_scores, video_scores,
                                                  metrics_left_out=campaign.metrics_left_out,
                                                  adapters=campaign.adapters,
                                                  campaign_prompts=prompt_count(campaign.items),
                                                  campaign_items=len(campaign.items))
        return {"campaign": name, "systems": campaign.systems, "items": len(campaign.items),
                "raters": sorted({row["rater"] for row in rows}), "criteria": criteria}

    async def answer(handler, *args) -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(handler, *args))
        except SlapgenError as error:
            return error_response(error)

    async def list_campaigns(request: Request) -> JSONResponse:
        return await answer(lambda: {"campaigns": store.overview()})

    async def get_pair(request: Request) -> JSONResponse:
        try:
            # Its own fields only: a parameter it ignores (utm=...) is not checked either.
            query = RaterQuery.model_validate({key: value for key, value in request.query_params.items()
                                               if key in RaterQuery.model_fields})
        except ValidationError as error:
            return JSONResponse(validation_error_body(error), status_code=400)
        return await answer(next_pair, request.path_params["name"], query.rater)

    async def get_video(request: Request) -> Response:
        token = request.path_params["file"].removesuffix(".mp4")
        try:
            path = await run_in_threadpool(store.video_file, request.path_params["name"], token)
        except SlapgenError as error:
            return error_response(error)
        return WholeFileOnBadRange(path, media_type="video/mp4")

    async def post_ratings(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        try:
            body = await run_in_threadpool(CampaignVerdictRequest.model_validate_json, await request.body() or b"{}")
        except ValidationError as error:
            return JSONResponse(validation_error_body(error), status_code=400)
        try:
            ids = await run_in_threadpool(store.answer, name, body.pair_id, body.rater, body.verdicts)
        except SlapgenError as error:
            return error_response(error)
        return JSONResponse({"ids": ids}, status_code=201)

    async def get_leaderboard(request: Request) -> JSONResponse:
        return await answer(leaderboard, request.path_params["name"])

    async def export_json(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        return await answer(lambda: {"campaign": name, "verdicts": store.verdicts(name)})

    async def export_csv(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            text = await run_in_threadpool(store.verdicts_csv, name)
        except SlapgenError as error:
            return error_response(error)
        return Response(text, media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}-verdicts.csv"'})

    return [
        Route("/campaigns", list_campaigns, methods=["GET"]),
        Route("/campaigns/{name}/pair", get_pair, methods=["GET"]),
        Route("/campaigns/{name}/videos/{file}", get_video, methods=["GET"]),
        Route("/campaigns/{name}/ratings", post_ratings, methods=["POST"]),
        Route("/campaigns/{name}/leaderboard", get_leaderboard, methods=["GET"]),
        Route("/campaigns/{name}/verdicts", export_json, methods=["GET"]),
        Route("/campaigns/{name}/verdicts.csv", export_csv, methods=["GET"]),
    ]

