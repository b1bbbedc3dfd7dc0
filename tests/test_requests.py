import json

import pytest
from pydantic import ValidationError

from slapgen.errors import SlapgenError
from slapgen.models.specs import COGVIDEOX_5B
from slapgen.models.tiny import TINY_SPEC
from slapgen.serving.requests import GenerateRequest


def _error_fields(body: dict, spec=None) -> set[str]:
    """Fields blamed at the edge (pydantic) or against the spec (slapgen's errors)."""
    try:
        GenerateRequest.model_validate(body).for_model(spec or TINY_SPEC)
    except ValidationError as error:
        return {".".join(str(part) for part in e["loc"]) for e in error.errors()}
    except SlapgenError as error:
        return {error.field}
    raise AssertionError(f"{body} was accepted")


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 4001}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "a", "num_frames": 10}, "num_frames"),
        ({"prompt": "a", "num_frames": 0}, "num_frames"),
        ({"prompt": "a", "num_frames": 53}, "num_frames"),
        ({"prompt": "a", "num_frames": 13}, "num_frames"),  # 4k+1 but not 8k+1
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a", "num_inference_steps": 201}, "num_inference_steps"),
        ({"prompt": "a", "height": 50}, "height"),
        ({"prompt": "a", "width": 112}, "width"),
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "colour": "red"}, "colour"),
        ({"prompt": "a", "adapter_scale": 0.5}, "adapter_scale"),  # was the base model, silently (an attack's find)
        ({"prompt": "a", "slots": {"k": "v"}}, "slots"),
    ],
)
def test_bad_requests_name_the_field(body, field):
    """Guards a request field refused without naming it, or accepted and ignored (adapter_scale without adapter)."""
    assert field in _error_fields(body)


def test_limits_come_from_the_model_spec():
    assert {"height"} == _error_fields({"prompt": "a", "height": 480, "width": 720}, TINY_SPEC)
    assert {"width"} == _error_fields({"prompt": "a", "width": 720}, TINY_SPEC)
    params = GenerateRequest(prompt="a", height=480, width=720).for_model(COGVIDEOX_5B)
    assert (params.height, params.width) == (480, 720)


def test_defaults_are_filled_from_the_spec():
    params = GenerateRequest(prompt="  a slap  ").for_model(COGVIDEOX_5B)
    assert params.prompt == "a slap"
    assert params.num_frames == 49
    assert params.num_inference_steps == 50
    assert params.guidance_scale == 6.0
    assert (params.height, params.width, params.fps) == (480, 720, 8)
    assert params.max_sequence_length == 226
    assert params.negative_prompt == ""


def test_explicit_values_win_and_zero_guidance_is_kept():
    params = GenerateRequest(prompt="a", num_frames=17, guidance_scale=0.0, seed=0, fps=12).for_model(TINY_SPEC)
    assert (params.num_frames, params.guidance_scale, params.seed, params.fps) == (17, 0.0, 0, 12)


def test_missing_seed_is_random_per_request():
    seeds = {GenerateRequest(prompt="a").for_model(TINY_SPEC).seed for _ in range(8)}
    assert len(seeds) > 1


def test_pipeline_arguments_are_what_the_pipeline_takes():
    import inspect

    from diffusers import CogVideoXPipeline

    accepted = set(inspect.signature(CogVideoXPipeline.__call__).parameters)
    kwargs = GenerateRequest(prompt="a").for_model(TINY_SPEC).pipeline_arguments()
    assert set(kwargs) <= accepted


@pytest.mark.parametrize("frames", [10, 13, 45])
def test_the_frame_rule_message_states_8k_plus_1(frames):
    """Guards the old edge check that told a 10-frame request "4k+1 (1, 5, 9, ...)" although every
    CogVideoX 1.0 model needs 8k+1."""
    with pytest.raises(SlapgenError) as error:
        GenerateRequest(prompt="a", num_frames=frames).for_model(COGVIDEOX_5B)
    assert error.value.field == "num_frames" and "8k+1 (1, 9, 17, ...)" in str(error.value) and "4k" not in str(error.value)


@pytest.mark.parametrize("size", [40, 48])
def test_a_size_hears_one_rule_the_models_multiple(size):
    """Guards two size rules on /generate: pydantic's multiple of 16 at the edge, then the spec's own multiple,
    so a Wan 2.2 TI2V-5B request (multiple 32) heard "a multiple of 16" for 40 and "a multiple of 32" for 48.
    Now one rule, the model's multiple, in one sentence naming it, as the {"error", "detail"} body."""
    from slapgen.models.wan import WAN22_TI2V_5B
    from slapgen.serving.http_errors import error_response

    assert (TINY_SPEC.size_multiple, WAN22_TI2V_5B.size_multiple) == (16, 32)
    for field in ("height", "width"):
        request = GenerateRequest.model_validate({"prompt": "a", field: size})  # no multiple at the edge
        with pytest.raises(SlapgenError) as refused:
            request.for_model(WAN22_TI2V_5B)
        sentence = (f"{field} must be a multiple of 32 up to {getattr(WAN22_TI2V_5B, field)} for "
                    f"Wan-AI/Wan2.2-TI2V-5B-Diffusers, got {size}")
        assert str(refused.value) == sentence and refused.value.field == field
        body = json.loads(error_response(refused.value).body)
        assert body == {"error": sentence, "detail": [{"loc": [field], "msg": sentence}]}
        if size % 16:
            with pytest.raises(SlapgenError, match=f"^{field} must be a multiple of 16 up to {getattr(TINY_SPEC, field)} "
                                                   f"for tiny, got {size}$"):
                request.for_model(TINY_SPEC)
        else:
            assert getattr(request.for_model(TINY_SPEC), field) == size


@pytest.mark.parametrize("spec_name", ["wan22-5b", "tiny"])
def test_a_size_is_one_rule_with_one_sentence_at_every_edge(spec_name):
    """Guards the size rule written twice: `checked_params` (`slapgen eval` / `generate --set`) had its own copy of the
    multiple-and-maximum check with another sentence than `GenerateRequest.for_model` (HTTP), so the same bad width
    read differently at each edge. Now `ModelSpec.check_size` owns it: for Wan 2.2 TI2V-5B (multiple 32) and tiny
    (16), a size off the multiple or over the native size gets the same sentence from both edges (eval's after the
    flag it came from), and a size the rule allows passes both."""
    from slapgen.models.wan import WAN22_TI2V_5B
    from trainer.errors import EvalError
    from trainer.evaluate.options import checked_params

    spec = {"wan22-5b": WAN22_TI2V_5B, "tiny": TINY_SPEC}[spec_name]
    multiple = {"wan22-5b": 32, "tiny": 16}[spec_name]
    assert spec.size_multiple == multiple
    for field in ("height", "width"):
        limit = getattr(spec, field)
        for value in (multiple + 8, multiple + 16, limit + multiple):  # 48 is a multiple of 16 but not of 32
            sentence = f"{field} must be a multiple of {multiple} up to {limit} for {spec.name}, got {value}"
            if value % multiple == 0 and value <= limit:
                assert getattr(GenerateRequest(prompt="a", **{field: value}).for_model(spec), field) == value
                assert getattr(checked_params(spec, {field: value}), field) == value
                continue
            with pytest.raises(SlapgenError) as http:
                GenerateRequest(prompt="a", **{field: value}).for_model(spec)
            with pytest.raises(EvalError) as cli:
                checked_params(spec, {field: value}, "--set")
            assert (str(http.value), http.value.field) == (sentence, field)
            assert str(cli.value) == f"--set {sentence}"


def test_readmes_body_field_rules_are_the_requests_bounds():
    """Guards README's body-field table drifting from the request model: a bound changed in
    `GenerateRequest` (steps, guidance, fps, scale, seed, prompt length) while README still gives the old
    range, so a client built from README gets 400s, or never tries what is allowed. Every "A..B" rule is
    the field's minimum and maximum in the request's JSON schema, "A-B characters" its lengths, and the text
    tokens a prompt is cut to each family's spec's."""
    import re

    from tests.conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    table = readme[readme.index("| field | meaning | rule |"):]
    table = table[:table.index("\n\n")]
    properties = GenerateRequest.model_json_schema()["properties"]

    def bounds(field: str) -> dict:
        schema = properties[field]
        return next((choice for choice in schema.get("anyOf", []) if choice.get("type") != "null"), schema)

    ranges = {field: rule for field, rule in re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|$", table, re.M)}
    checked = []
    for field, rule in ranges.items():
        if numbers := re.match(r"(\d+)\.\.(2\^(\d+)-1|\d+)", rule):
            upper = 2 ** int(numbers[3]) - 1 if numbers[3] else int(numbers[2])
            assert (bounds(field)["minimum"], bounds(field)["maximum"]) == (int(numbers[1]), upper), (field, rule)
            checked.append(field)
        elif lengths := re.match(r"(\d+)-(\d+) characters", rule):
            assert (bounds(field)["minLength"], bounds(field)["maxLength"]) == (int(lengths[1]), int(lengths[2])), field
            checked.append(field)
        if default := re.search(r"\(default (\d+)\)", rule):  # a default of the request itself, not of the model
            assert properties[field]["default"] == int(default[1]), (field, rule)
    assert sorted(checked) == ["adapter_scale", "fps", "guidance_scale", "num_inference_steps", "prompt", "seed"]
    # What the model reads of a prompt: each family's text length, as the specs say.
    from slapgen.models.tiny_wan import TINY_WAN_SPEC
    from slapgen.models.wan import WAN_SPECS

    read = re.search(r"reads (\d+) text tokens, its end token included \(Wan (\d+), tiny and tiny-wan (\d+)\)",
                     ranges["prompt"])
    assert read is not None, ranges["prompt"]
    assert int(read[1]) == COGVIDEOX_5B.max_sequence_length
    assert {int(read[2])} == {spec.max_sequence_length for spec in WAN_SPECS.values()}
    assert {int(read[3])} == {TINY_SPEC.max_sequence_length, TINY_WAN_SPEC.max_sequence_length}
