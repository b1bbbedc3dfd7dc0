"""What of a prompt the model reads: its text tokens, the model's limit, and the words cut past it.

The text encoder reads `max_sequence_length` tokens (CogVideoX 226, Wan 512), its end token included. Both
families' pipelines tokenize with `truncation=True`, which keeps the first `limit - 1` tokens and the end token,
so what is cut is the tokens from `limit - 1` up to the end token: the span CogVideoX's pipeline names in the
server log ("The following part of your input was truncated ...") and Wan's cuts without a word. A client
sees it in `POST /prompts/render`'s answer (the cut words too), and in the `X-Prompt-Tokens` and
`X-Prompt-Max-Tokens` headers of `/generate`'s and `/jobs/submit`'s answers.

The text counted is the text the family's pipeline tokenizes (`ModelFamily.prompt_text`: Wan's pipeline cleans
a prompt first, unescaping HTML entities and collapsing whitespace), and the cut is decoded from it.

A fast tokenizer is not safe to share between threads (its Rust side raises "Already borrowed" when two calls
overlap), and the pipeline's own is in use by whichever generation holds the model: this keeps a copy of its
own, taken when the engine loads (copying Wan's 256k-token vocabulary takes about a second), used by one thread
at a time.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTokens:
    count: int  # the prompt's tokens, its end token included
    limit: int  # the tokens the model reads (`ModelSpec.max_sequence_length`)
    cut: str | None  # the text past the limit, as the tokenizer decodes it; None when nothing is cut

    def as_dict(self) -> dict:
        return {"tokens": self.count, "max_tokens": self.limit, "cut": self.cut}


class PromptTokenCounter:
    """`count(prompt)` against `limit`, with a private copy of `tokenizer` (thread-safe); `prompt_text`: what the
    pipeline makes of a prompt before tokenizing it (the family's `prompt_text`)."""

    def __init__(self, tokenizer, limit: int, prompt_text: Callable[[str], str] = str):
        self._tokenizer = copy.deepcopy(tokenizer)
        self._limit = limit
        self._prompt_text = prompt_text
        self._lock = threading.Lock()

    def count(self, prompt: str) -> PromptTokens:
        text = self._prompt_text(prompt)
        with self._lock:
            # verbose=False: transformers' "indexing errors" warning for a text longer than the model reads is this
            # module's very subject, not an error
            ids = self._tokenizer(text, add_special_tokens=True, verbose=False).input_ids
            cut = None
            if len(ids) > self._limit:
                cut = self._tokenizer.decode(ids[self._limit - 1:-1])
        return PromptTokens(count=len(ids), limit=self._limit, cut=cut)
