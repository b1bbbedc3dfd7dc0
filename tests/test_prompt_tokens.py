"""What of a prompt the model reads (`slapgen.engine.prompt_tokens`, `POST /prompts/render`), held to what the
pipelines themselves do with it."""

from __future__ import annotations

import logging

import pytest
from diffusers.utils import logging as diffusers_logging

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
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # whatever an earlier test (or library) set: the warning is the reference
    try:
        pipeline.encode_prompt(KNOCKOUT, do_classifier_free_guidance=False, max_sequence_length=limit, device="cpu")
    finally:
        diffusers_log.removeHandler(said)
        diffusers_logging.set_verbosity(verbosity)
    (warning,) = [message for message in said.messages if "was truncated" in message]
    assert warning.endswith(f"{limit} tokens: [{measured.cut!r}]"), (warning, measured)
    assert measured.count == len(pipeline.tokenizer(KNOCKOUT).input_ids) > limit == measured.limit
    short = "a power slap"
    assert counter.count(short).cut is None
    assert counter.count(short).count == len(pipeline.tokenizer(short).input_ids) <= limit


def test_the_count_is_of_the_text_wans_pipeline_tokenizes(tiny_wan_cache_dir):
    """Guards counting another text than Wan's pipeline reads: WanPipeline cleans a prompt before tokenizing it
    (HTML entities unescaped, whitespace collapsed), so a caption with `&amp;` or double spaces was counted
    longer than it is, and an escaped `&lt;/s&gt;` that the model reads as an end token was not seen. The
    pipeline's own encode_prompt is run with its tokenizer watched: the count is the tokens of the text it was
    given, and the cut what its truncating call (padded to the limit, end token kept) leaves out."""
    from slapgen.models.family import family_of

    resolved = resolve_model("tiny-wan", tiny_wan_cache_dir)
    pipeline = load_pipeline(resolved)
    limit = resolved.spec.max_sequence_length
    prompt = "the striker &amp; the   referee &amp;lt;/s&amp;gt; at the table,  " + KNOCKOUT
    counter = PromptTokenCounter(pipeline.tokenizer, limit, family_of(resolved.spec).prompt_text)
    tokenizer, given = pipeline.tokenizer, []

    def watched(text, **options):
        given.append((text, options))
        return tokenizer(text, **options)

    pipeline.tokenizer = watched
    try:
        pipeline.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=limit, device="cpu")
    finally:
        pipeline.tokenizer = tokenizer
    ((read_texts, options),) = given
    (read_text,) = read_texts if isinstance(read_texts, list) else [read_texts]
    assert "&amp;" not in read_text and "  " not in read_text and "</s>" in read_text  # cleaned by the pipeline
    untruncated = tokenizer(read_text).input_ids
    read = tokenizer(read_text, **{**options, "return_tensors": None}).input_ids
    assert read == untruncated[:limit - 1] + untruncated[-1:]
    measured = counter.count(prompt)
    assert measured.count == len(untruncated) > limit
    assert measured.cut == tokenizer.decode(untruncated[limit - 1:-1])


def test_a_caption_of_exactly_the_limit_is_not_cut(tiny_pipeline):
    """Guards the boundary: a caption of exactly `limit` tokens (end token included) is read whole (cut None, not
    an empty string); one word more cuts exactly that word, the last."""
    resolved, pipeline = tiny_pipeline
    limit = resolved.spec.max_sequence_length
    counter = PromptTokenCounter(pipeline.tokenizer, limit)
    exactly = " ".join(["slap"] * (limit - 1))
    assert (counter.count(exactly).count, counter.count(exactly).cut) == (limit, None)
    over = counter.count(exactly + " table")
    assert (over.count, over.cut) == (limit + 1, "table")
