"""What of a prompt the model reads (`slapgen.engine.prompt_tokens`, `POST /prompts/render`), held to what the
pipelines themselves do with it."""

from __future__ import annotations

import logging

import pytest

from prompts import default_library
from slapgen.engine.prompt_tokens import PromptTokenCounter
from slapgen.models.loading import load_pipeline, resolve_model

KNOCKOUT = default_library().render("knockout", {})  # 97 tokens on tiny's tokenizer, past its 32


class Recorded(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_cache_dir):
    resolved = resolve_model("tiny", tiny_cache_dir)
    return resolved, load_pipeline(resolved)


def test_the_cut_is_the_text_cogvideoxs_pipeline_says_it_cuts(tiny_pipeline):
    """Guards the count or the cut differing from what the model reads: CogVideoX's own pipeline (diffusers'
    encode_prompt, at the spec's max_sequence_length) names the text it cuts in a warning, and the counter's cut
    is that text; the count is the tokens of the untruncated text (end token included); a prompt that fits has
    no cut, and counts the same as the tokenizer."""
    resolved, pipeline = tiny_pipeline
    limit = resolved.spec.max_sequence_length
    counter = PromptTokenCounter(pipeline.tokenizer, limit)
    measured = counter.count(KNOCKOUT)
    said = Recorded()
    diffusers_log = logging.getLogger("diffusers.pipelines.cogvideo.pipeline_cogvideox")
    diffusers_log.addHandler(said)
    try:
        pipeline.encode_prompt(KNOCKOUT, do_classifier_free_guidance=False, max_sequence_length=limit, device="cpu")
    finally:
        diffusers_log.removeHandler(said)
    (warning,) = [message for message in said.messages if "was truncated" in message]
    assert warning.endswith(f"{limit} tokens: [{measured.cut!r}]"), (warning, measured)
    assert measured.count == len(pipeline.tokenizer(KNOCKOUT).input_ids) > limit == measured.limit
    short = "a power slap"
    assert counter.count(short).cut is None
    assert counter.count(short).count == len(pipeline.tokenizer(short).input_ids) <= limit


def test_the_cut_is_what_wans_pipeline_leaves_out(tiny_wan_cache_dir):
    """Guards the cut for Wan, whose pipeline cuts without a word: its text encoder's input (the tokenizer called
    as WanPipeline calls it: padded to max_sequence_length, truncated, special tokens added) is the text's first
    limit - 1 tokens and its end token, so what is left out is the cut, decoded."""
    resolved = resolve_model("tiny-wan", tiny_wan_cache_dir)
    tokenizer = load_pipeline(resolved).tokenizer
    limit = resolved.spec.max_sequence_length
    measured = PromptTokenCounter(tokenizer, limit).count(KNOCKOUT)
    untruncated = tokenizer(KNOCKOUT).input_ids
    read = tokenizer(KNOCKOUT, padding="max_length", max_length=limit, truncation=True, add_special_tokens=True).input_ids
    assert read == untruncated[:limit - 1] + untruncated[-1:]
    assert measured.cut == tokenizer.decode(untruncated[limit - 1:-1]) and measured.count == len(untruncated) > limit
