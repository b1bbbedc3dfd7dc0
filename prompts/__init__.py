"""Prompt templates for Power Slap scenarios, rendered into training-style captions."""

from prompts.library import PromptLibrary, RenderError, default_library

__all__ = ["PromptLibrary", "RenderError", "default_library"]
