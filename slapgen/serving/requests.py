"""The HTTP request bodies and their resolution against the running model.

Validation happens twice on purpose: once at the HTTP edge (types, ranges, unknown fields: pydantic,
which BentoML answers with a 400 naming the field) and once with the loaded model's spec as context
(frame rule and size limits, template, adapter, a TIC-FT adapter's condition image), which raises
`slapgen.errors` exceptions carrying the field; the service maps both to the same 400 JSON shape.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import threading
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

from prompts import PromptLibrary, default_library
from slapgen.engine.adapters import ADAPTER_NAME_PATTERN
from slapgen.engine.conditioning import CONDITION_FIELD, check_condition, check_frames
from slapgen.engine.params import GenerationParams
from slapgen.engine.prompt_tokens import PromptTokens
from slapgen.errors import ImageError, RequestError, closest_name_hint, shown_name
from slapgen.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_image, fitted_image
from slapgen.models.specs import BASE_SIZE_MULTIPLE as SIZE_MULTIPLE
from slapgen.models.specs import ModelSpec
from slapgen.models.ticft import TicftLayout
from slapgen.names import CRITERIA
from slapgen.serving.http_errors import CONTROL_CHARACTER_ERROR
from slapgen.serving.ratings import CHOICES

MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**63 - 1
MAX_ADAPTER_SCALE = 4.0
MAX_INFERENCE_STEPS = 200
MAX_GUIDANCE_SCALE = 50
# Base64 of the largest accepted image, with room for a data: prefix and line breaks: what the generation
# routes' body limit must hold. Not a field constraint: the body limit bounds the string, and decode_image's
# byte limit is the one rule a client reads ("larger than 8 MiB", not a count of base64 characters).
MAX_CONDITION_IMAGE_CHARS = MAX_IMAGE_BYTES * 4 // 3 + 256 * 1024
DATA_URI = re.compile(r"data:image/(?:png|jpe?g);base64,", re.IGNORECASE)

Prompt = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_PROMPT_CHARS)]
AdapterName = Annotated[str, StringConstraints(pattern=ADAPTER_NAME_PATTERN.pattern)]
TemplateName = Annotated[str, StringConstraints(min_length=1, max_length=64)]
SlotValues = dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=200)]]


# Far above any body a client means (a request has under 20 fields, at most 32 slots): pydantic reports each
# unknown field or refused dict entry, and listing a million of them (12 MB of `{"k0": 0, ...}`) held the
# worker's event loop for seconds per request; past this the body is one problem.
MAX_OBJECT_MEMBERS = 256


# Control characters other than whitespace (tab, line feed, vertical tab, form feed, carriage return): no prompt, name
# or id means one, PostgreSQL refuses a NUL in text (a 500 and a traceback for a rater named "r\u0000"), and SQLite
# kept it for the CSV.
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


class RequestBody(BaseModel):
    """A JSON request body (or a query's fields): no object in it has more than MAX_OBJECT_MEMBERS members, no
    text in it (a value or a key) holds a control character (`CONTROL_CHARACTER`), and its values have the JSON
    types they are documented with. pydantic's lax mode read `"seed": false` as seed 0, `"num_frames": true` as 1
    and `"seed": "7"` as 7: a client's bug passed as a request it never meant."""

    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _bounded_objects(cls, data):
        pending, found = [data], False
        while pending:  # no path kept per value: a body may hold a million of them
            value = pending.pop()
            if isinstance(value, str):
                found = found or CONTROL_CHARACTER.search(value) is not None
            elif isinstance(value, dict):
                if len(value) > MAX_OBJECT_MEMBERS:
                    raise PydanticCustomError("too_many_members", "an object of {count} members is more than a body "
                                              "may hold ({limit})", {"count": len(value), "limit": MAX_OBJECT_MEMBERS})
                found = found or any(isinstance(key, str) and CONTROL_CHARACTER.search(key) for key in value)
                pending.extend(member for member in value.values() if isinstance(member, (str, dict, list)))
            elif isinstance(value, list):
                pending.extend(member for member in value if isinstance(member, (str, dict, list)))
        if found:
            _refuse_control_characters(data)
        return data


def _refuse_control_characters(data) -> None:
    """The PydanticCustomError naming where the first control character of `data` is (a value, or a key of an
    object), found again with the paths this time."""
    pending = [((), data)]
    while pending:
        where, value = pending.pop(0)
        texts = [(where, value, False)] if isinstance(value, str) else \
            [(where, key, True) for key in value if isinstance(key, str)] if isinstance(value, dict) else []
        for place, text, is_key in texts:
            if found := CONTROL_CHARACTER.search(text):
                field = ".".join(shown_name(str(part), quoted=False) for part in place) or "the body"
                raise PydanticCustomError(CONTROL_CHARACTER_ERROR, "{field} holds the control character U+{code}, "
                                          "which no text of a request may hold",
                                          {"field": f"a key of {field}" if is_key else field,
                                           "code": f"{ord(found.group()):04X}", "where": list(place)})
        if isinstance(value, dict):
            pending.extend(((*where, key), member) for key, member in value.items())
        elif isinstance(value, list):
            pending.extend(((*where, k), member) for k, member in enumerate(value))


class RenderRequest(RequestBody):
    """Body of `POST /prompts/render`."""

    model_config = ConfigDict(extra="forbid")

    template: TemplateName
    slots: SlotValues = Field(default_factory=dict, max_length=32)

    def render(self, library: PromptLibrary | None = None) -> str:
        """The caption; raises `prompts.RenderError` naming the template or slot."""
        return (library or default_library()).render(self.template, self.slots)


class GenerateRequest(RequestBody):
    """Body of `POST /generate`: `prompt`, or `template` + `slots`. Other fields default from the model spec."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt | None = None
    template: TemplateName | None = None
    slots: SlotValues | None = Field(None, max_length=32)
    adapter: AdapterName | None = Field(None, description="adapter name; null for the base model")
    adapter_scale: float = Field(1.0, ge=0, le=MAX_ADAPTER_SCALE, description="strength of the adapter")
    negative_prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = None
    num_frames: int | None = Field(None, ge=1, description="the model's frame rule (8k+1 for CogVideoX 1.0), at most its maximum")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE_SCALE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when omitted; echoed in X-Seed")
    fps: int | None = Field(None, ge=1, le=60)
    # The multiple is the model's (`ModelSpec.size_multiple`: 16, or 32 for Wan 2.2 TI2V-5B), checked in
    # `for_model` only (`ModelSpec.check_size`), so every size hears one rule; here only the bound no model goes below.
    height: int | None = Field(None, ge=SIZE_MULTIPLE, description="a multiple of the model's size_multiple "
                                                                 "(GET /info: limits.size_multiple), at most its native height")
    width: int | None = Field(None, ge=SIZE_MULTIPLE, description="a multiple of the model's size_multiple "
                                                                "(GET /info: limits.size_multiple), at most its native width")
    condition_image: str | None = Field(
        None, description="TIC-FT adapters only: the frame to animate, a base64 PNG or JPEG (or a data: URI), "
                          "at most 8 MiB; resized and centre-cropped to the output size")
    include_condition_frames: bool = Field(
        False, description="TIC-FT: return the whole clip, condition frames first (default: the target frames)")

    def for_model(self, spec: ModelSpec, adapters: list[str] | None = None,
                  ticft_layout: Callable[[str], TicftLayout | None] | None = None) -> GenerationParams:
        """Check against `spec`, the available `adapters` and each adapter's TIC-FT layout (`ticft_layout`,
        name -> layout or None), render a template, decode a condition image, fill every default.
        Raises `RequestError` / `FrameCountError` / `RenderError`, each naming the field."""
        if (self.prompt is None) == (self.template is None):
            raise RequestError("give either prompt or template (with slots), not both or neither", field="prompt")
        if self.slots is not None and self.template is None:
            raise RequestError("slots are only used with template", field="slots")
        if "adapter_scale" in self.model_fields_set and self.adapter is None:  # the base model, silently, before
            raise RequestError("adapter_scale is only used with adapter (the base model has no adapter to scale)",
                               field="adapter_scale")
        prompt = self.prompt
        if self.template is not None:
            prompt = RenderRequest(template=self.template, slots=self.slots or {}).render()
        for field in ("height", "width"):
            if (value := getattr(self, field)) is not None:
                try:
                    spec.check_size(field, value)  # the one size rule, `slapgen eval`'s and `generate`'s too
                except ValueError as error:
                    raise RequestError(str(error), field=field) from None
        check_served(self.adapter, adapters, "adapter")
        layout = None
        if ticft_layout is not None:  # without it the engine makes the same checks when it generates
            layout = ticft_layout(self.adapter) if self.adapter is not None else None
            check_condition(self.adapter, layout, self.condition_image is not None, self.include_condition_frames)
        if layout is not None:
            # The layout's count, checked before the model's rule, which it passes (`check_fits`): "num_frames must
            # be 4k+1, got 10" sent a walk-through to 9 or 13 before it heard the layout wants exactly 9.
            num_frames = layout.pixel_frames if self.num_frames is None else self.num_frames
            check_frames(num_frames, layout)
        elif self.num_frames is not None:
            num_frames = spec.check_frame_count(self.num_frames)
        else:
            num_frames = spec.default_num_frames
        height, width = self.height or spec.height, self.width or spec.width
        condition = (decode_condition_image(self.condition_image, (height, width))
                     if self.condition_image is not None else None)
        return GenerationParams(
            prompt=prompt,
            negative_prompt=self.negative_prompt or "",
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=self.num_inference_steps or spec.default_num_inference_steps,
            guidance_scale=spec.default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
            seed=secrets.randbelow(2**32) if self.seed is None else self.seed,
            max_sequence_length=spec.max_sequence_length,
            fps=self.fps or spec.fps,
            adapter=self.adapter,
            adapter_scale=self.adapter_scale,
            condition_image=condition,
            include_condition_frames=self.include_condition_frames,
        )


def decode_condition_image(text: str, fitted_to: tuple[int, int] | None = None) -> np.ndarray:
    """`condition_image` (base64, or a data:image/png|jpeg;base64 URI) -> RGB uint8 (H, W, 3), or with `fitted_to`
    (height, width) `images.fitted_image`'s float32 pixels at that size, made while the decode's memory is still
    held; RequestError naming the field for anything else."""
    body = text.strip()
    if body[:5].lower() == "data:":
        prefix = DATA_URI.match(body)
        if prefix is None:
            raise RequestError("condition_image: a data URI must start data:image/png;base64, or data:image/jpeg;base64,",
                               field=CONDITION_FIELD)
        body = body[prefix.end():]
    try:
        data = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        # A path or URL sent as the value read as bad base64 alone.
        raise RequestError("condition_image is not valid base64: send the image's bytes in base64 (`base64 -w0 "
                           "face.png`), not a path or URL", field=CONDITION_FIELD) from None
    try:
        with _DECODING:  # the decode and the fit: a 4096x4096 image's fit alone takes 200 MB while it runs
            image = decode_image(data)
            return image if fitted_to is None else fitted_image(image, *fitted_to)
    except ImageError as error:
        raise RequestError(f"condition_image: {error}", field=CONDITION_FIELD) from None


# Condition images a worker decodes (and fits) at once: a 4096x4096 PNG takes about 200 MB while it is decoded, and as
# much again while it is fitted to the output size, and 24 at once
# took a worker from 0.7 to 6.4 GB (an attack's find; the 80 requests `ConcurrencyLimit` lets in could take 19 GB).
# The others wait their turn holding only their base64.
CONDITION_DECODES_AT_ONCE = 2
_DECODING = threading.BoundedSemaphore(CONDITION_DECODES_AT_ONCE)


def request_limits(spec: ModelSpec) -> dict:
    """What a `/generate` body may ask of this model, and what it gets by default (for clients' forms)."""
    return {
        "max_num_frames": spec.max_num_frames, "frame_step": spec.frame_step, "max_height": spec.height,
        "max_width": spec.width, "size_multiple": spec.size_multiple, "max_inference_steps": MAX_INFERENCE_STEPS,
        "max_guidance_scale": MAX_GUIDANCE_SCALE, "max_adapter_scale": MAX_ADAPTER_SCALE,
        "max_prompt_chars": MAX_PROMPT_CHARS, "max_seed": MAX_SEED,
        "max_image_bytes": MAX_IMAGE_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS,  # a condition image's, decoded
        "defaults": {"num_frames": spec.default_num_frames, "height": spec.height, "width": spec.width,
                     "num_inference_steps": spec.default_num_inference_steps,
                     "guidance_scale": spec.default_guidance_scale, "fps": spec.fps},
    }


def check_served(adapter: str | None, adapters: list[str] | None, field: str) -> None:
    """RequestError naming `field` unless `adapter` is None (the base model), `adapters` is None (not checked
    here) or one of `adapters`, the adapters this server serves."""
    if adapter is not None and adapters is not None and adapter not in adapters:
        raise RequestError(f"unknown adapter {adapter!r}{closest_name_hint(adapter, adapters)}; available: "
                           f"{', '.join(adapters) or 'none'}", field=field)


class RatedSystem(RequestBody):
    """One side of a blind pair: the base model, or an adapter at a scale. A `RequestBody` itself: a nested model
    keeps its own config, so the body's strict JSON types hold inside it only through this."""

    model_config = ConfigDict(extra="forbid")
    adapter: AdapterName | None = Field(None, description="adapter name; null for the base model")
    adapter_scale: float = Field(1.0, ge=0, le=MAX_ADAPTER_SCALE)

    def name(self) -> str:
        return self.adapter or "base"

    def scale(self) -> float | None:
        """The adapter's scale; None for the base model, which no scale changes (stored as 1.0, it read as an
        adapter's strength, and base at 0.5 against base passed as two systems)."""
        return None if self.adapter is None else self.adapter_scale


class RatingRequest(RequestBody):
    """A rater's verdicts on one blind pair (same prompt and seed), one choice per criterion."""

    model_config = ConfigDict(extra="forbid")
    left: RatedSystem
    right: RatedSystem
    prompt: Prompt
    seed: int = Field(ge=0, le=MAX_SEED)
    choices: dict[Literal[CRITERIA], Literal[CHOICES]] = Field(min_length=1, description="criterion -> left, right or tie")
    rater: Annotated[str, StringConstraints(strip_whitespace=True, max_length=64)] = ""

    def rows(self, adapters: list[str] | None = None) -> list[dict]:
        """What `RatingStore.add` stores: one row per criterion. Each side must be the base model or one of
        `adapters` (the server's; None: not checked): a rating of a system nobody served says nothing, and
        the summary's work grows with every distinct system, so a client posting made-up names would slow
        `/ratings/summary` for every rater."""
        if (self.left.name(), self.left.scale()) == (self.right.name(), self.right.scale()):
            raise RequestError("the two sides of a pair must be different systems", field="right")
        check_served(self.left.adapter, adapters, "left.adapter")
        check_served(self.right.adapter, adapters, "right.adapter")
        return [{"rater": self.rater, "criterion": criterion, "choice": choice, "left_system": self.left.name(),
                 "left_scale": self.left.scale(), "right_system": self.right.name(),
                 "right_scale": self.right.scale(), "prompt": self.prompt, "seed": self.seed}
                for criterion, choice in self.choices.items()]


# The seed a generation runs with (drawn when the request has none), on `/generate`'s answer and `/jobs/submit`'s.
SEED_HEADER = "X-Seed"
# What of a prompt the model reads, on the answer of every route that takes one to generate (`/generate`,
# `/jobs/submit`): the pipeline cuts a longer prompt to the model's limit, which a client would not hear of.
PROMPT_TOKENS_HEADER = "X-Prompt-Tokens"
PROMPT_MAX_TOKENS_HEADER = "X-Prompt-Max-Tokens"


def prompt_token_headers(tokens: PromptTokens) -> dict[str, str]:
    """What `PromptTokenCounter.count` found, as response headers."""
    return {PROMPT_TOKENS_HEADER: str(tokens.count), PROMPT_MAX_TOKENS_HEADER: str(tokens.limit)}
