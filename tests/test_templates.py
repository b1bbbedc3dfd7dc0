"""Prompt templates: the library is valid data, every scenario renders a caption in the training band."""

from __future__ import annotations

import pytest
import yaml

from prompts import PromptLibrary, RenderError, default_library
from prompts.library import TEMPLATES_FILE, ChoiceSlot
from trainer.curate.captions import ASPECTS, check_caption

LIBRARY = default_library()
SCENARIOS = {"face-off", "wind-up-and-strike", "knockout", "absorb-and-reset", "stagger-and-recovery",
             "foul-and-intervention", "slow-motion-replay", "crowd-and-corner"}


def test_all_required_scenarios_exist():
    assert SCENARIOS <= set(LIBRARY.templates)


def _extreme_values(template: str, pick) -> dict[str, str]:
    values = {}
    for name in LIBRARY.templates[template].slots:
        slot = LIBRARY.slots[name]
        if isinstance(slot, ChoiceSlot):
            values[name] = pick(slot.choices, key=lambda choice: len(choice.split()))
        else:
            values[name] = "Slap" if pick is min else " ".join(["Word"] * slot.max_words)
    return values


@pytest.mark.parametrize("template", sorted(SCENARIOS))
def test_every_rendering_is_a_50_to_100_word_caption(template):
    # Word count is a sum over slots, so the all-shortest and all-longest values bound every rendering.
    for pick in (min, max):
        text = LIBRARY.render(template, _extreme_values(template, pick))
        assert 50 <= len(text.split()) <= 100, (template, pick.__name__, len(text.split()))
        assert "{" not in text and "  " not in text


@pytest.mark.parametrize("template", sorted(SCENARIOS))
@pytest.mark.parametrize("pick", [min, max], ids=["shortest", "longest"])
def test_template_captions_pass_the_products_own_caption_checker(template, pick):
    """Guards templates that render captions our own curation would flag or score low: with the shortest
    and the longest slot values, `check_caption` finds no issue and all four aspects."""
    report = check_caption(LIBRARY.render(template, _extreme_values(template, pick)))
    assert report.issues == [] and report.garbage_reasons == []
    assert set(report.aspects) == set(ASPECTS), report.aspects
    assert report.score == 1.0


@pytest.mark.parametrize("template", sorted(SCENARIOS))
def test_captions_cover_the_four_aspects(template):
    text = LIBRARY.render(template).lower()
    assert any(w in text for w in ("motion", "swing", "whips", "rushes", "leaps", "sweeps")), "motion dynamics"
    assert any(w in text for w in ("stance", "weight", "feet", "foot", "table", "corner", "legs")), "positioning"
    assert any(w in text for w in ("impact", "strike", "lands", "palm", "slap")), "impact physics"
    assert "camera" in text, "camera"


def test_slots_fill_and_defaults_apply():
    text = LIBRARY.render("wind-up-and-strike", {"striker": "green", "hand": "left"})
    assert "green shirt" in text and "open left hand" in text and "blue shirt" in text  # defender default


@pytest.mark.parametrize(
    "template, slots, field, names",
    [
        ("nope", {}, "template", "knockout"),
        ("knockout", {"colour": "red"}, "slots.colour", "striker"),
        ("knockout", {"striker": "purple"}, "slots.striker", "yellow"),
        ("knockout", {"event": "Drop table; --"}, "slots.event", "words"),
        ("knockout", {"event": "one two three four five"}, "slots.event", "1-4 words"),
    ],
)
def test_bad_template_or_slot_names_the_valid_ones(template, slots, field, names):
    with pytest.raises(RenderError) as error:
        LIBRARY.render(template, slots)
    assert error.value.field == field and names in str(error.value)


def test_a_choice_slots_refusal_quotes_each_choice():
    """Guards a refusal joining choices that hold commas themselves with ", " (the camera's: "... frames both
    athletes and the table, the camera pans ..." read as more choices than there are): each choice is quoted."""
    camera = LIBRARY.slots["camera"]
    with pytest.raises(RenderError) as error:
        LIBRARY.render("knockout", {"camera": "a drone"})
    assert str(error.value).endswith("slot camera must be one of: " + ", ".join(repr(c) for c in camera.choices))


def test_library_rejects_placeholders_without_slots(tmp_path):
    data = yaml.safe_load(TEMPLATES_FILE.read_text())
    data["templates"]["knockout"]["text"] += " {crowd}"
    with pytest.raises(ValueError, match="placeholders"):
        PromptLibrary.model_validate(data)


def test_describe_lists_slots_with_choices_and_defaults():
    described = {t["name"]: t for t in LIBRARY.describe()}
    striker = described["knockout"]["slots"]["striker"]
    assert striker["kind"] == "choice" and "red" in striker["choices"] and striker["default"] == "red"


@pytest.mark.parametrize("template, slots, said", [
    ("knockot", {}, "; valid templates: face-off, wind-up-and-strike, knockout, absorb-and-reset, stagger-and-recovery, "
                    "foul-and-intervention, slow-motion-replay, crowd-and-corner (did you mean knockout?)"),
    ("knockout", {"strker": "red"}, "template knockout has no slot 'strker'; valid slots: striker, defender, hand, "
                                    "camera, event (did you mean striker?)"),
    ("knockout", {"nope": "1"}, "template knockout has no slot 'nope'; valid slots: striker, defender, hand, camera, "
                                "event"),
])
def test_a_misspelt_template_or_slot_gets_the_closest_name(template, slots, said):
    """Guards `--slot strker=red` answered with the list alone while `--set` names the key it most likely means (a
    walk-through's find): the template's and the slot's sentences end with the same hint, and with none for a name
    like no other."""
    with pytest.raises(RenderError) as error:
        LIBRARY.render(template, slots)
    assert str(error.value).endswith(said)
