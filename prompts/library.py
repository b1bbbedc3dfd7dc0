"""Templates as data: `templates.yaml` declares typed slots and scenario texts with `{slot}` holes.

The library is validated once when loaded (every placeholder is a declared slot of its template,
every default is valid), so rendering only has to check the caller's slot values.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from slapgen.errors import SlapgenError, closest_name_hint

TEMPLATES_FILE = Path(__file__).parent / "templates.yaml"
TEXT_SLOT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 '-]*$")


class RenderError(SlapgenError):
    """A template or slot the caller named does not exist, or a slot value is not allowed.

    `field` is the request field to blame (`template` or `slots.<name>`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message, field=field)


class _Slot(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    description: str


class ChoiceSlot(_Slot):
    kind: Literal["choice"]
    choices: list[str] = Field(min_length=1)
    default: str

    @model_validator(mode="after")
    def _default_is_a_choice(self) -> "ChoiceSlot":
        if self.default not in self.choices:
            raise ValueError(f"default {self.default!r} is not one of the choices")
        return self

    def check(self, name: str, value: str) -> str:
        if value not in self.choices:
            # Each quoted: a choice may hold commas itself ("... frames both athletes, then pans ...").
            raise RenderError(f"slots.{name}", f"slot {name} must be one of: "
                                               f"{', '.join(repr(choice) for choice in self.choices)}")
        return value


class TextSlot(_Slot):
    kind: Literal["text"]
    max_words: int = Field(ge=1)
    default: str

    def check(self, name: str, value: str) -> str:
        value = " ".join(str(value).split())
        if not TEXT_SLOT_PATTERN.match(value) or len(value.split()) > self.max_words:
            raise RenderError(
                f"slots.{name}",
                f"slot {name} must be 1-{self.max_words} words of letters, digits, spaces, ' or -",
            )
        return value


Slot = Annotated[Union[ChoiceSlot, TextSlot], Field(discriminator="kind")]


class Template(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str
    slots: list[str]
    text: str

    def placeholders(self) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(self.text) if name}


class PromptLibrary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    slots: dict[str, Slot]
    templates: dict[str, Template] = Field(min_length=1)

    @model_validator(mode="after")
    def _templates_use_declared_slots(self) -> "PromptLibrary":
        for name, template in self.templates.items():
            undeclared = set(template.slots) - set(self.slots)
            if undeclared:
                raise ValueError(f"template {name} lists unknown slots {sorted(undeclared)}")
            if template.placeholders() != set(template.slots):
                raise ValueError(f"template {name}: placeholders {sorted(template.placeholders())} != slots {template.slots}")
        return self

    @classmethod
    def from_yaml(cls, path: Path) -> "PromptLibrary":
        return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))

    def describe(self) -> list[dict]:
        """What `GET /templates` returns: each template with its slots, kinds, choices and defaults."""
        return [
            {
                "name": name,
                "title": template.title,
                "slots": {slot: self.slots[slot].model_dump() for slot in template.slots},
            }
            for name, template in self.templates.items()
        ]

    def render(self, template: str, slots: dict[str, str] | None = None) -> str:
        """The caption for `template` with `slots` filled (defaults for the rest); raises RenderError."""
        if template not in self.templates:
            raise RenderError("template", f"unknown template {template!r}; valid templates: {', '.join(self.templates)}"
                                          f"{closest_name_hint(template, self.templates)}")
        chosen = self.templates[template]
        slots = slots or {}
        unknown = sorted(set(slots) - set(chosen.slots))
        if unknown:
            raise RenderError(
                f"slots.{unknown[0]}",
                f"template {template} has no slot {unknown[0]!r}; valid slots: {', '.join(chosen.slots)}"
                f"{closest_name_hint(unknown[0], chosen.slots)}",
            )
        values = {
            name: self.slots[name].check(name, slots[name]) if name in slots else self.slots[name].default
            for name in chosen.slots
        }
        return " ".join(chosen.text.format(**values).split())


@lru_cache(maxsize=1)
def default_library() -> PromptLibrary:
    return PromptLibrary.from_yaml(TEMPLATES_FILE)
