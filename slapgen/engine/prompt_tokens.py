"""What of a prompt the model reads: its text tokens, the model's limit, and the words cut past it.

The text encoder reads `max_sequence_length` tokens (CogVideoX 226, Wan 512), its end token included. Both
families' pipelines tokenize with `truncation=True`, which keeps the first `limit - 1` tokens and the end token,
so what is cut is the tokens from `limit - 1` up to the end token: the span CogVideoX's pipeline names in the
server log ("The following part of your input was truncated ...") and Wan's cuts without a word. A client only
sees it here (`POST /prompts/render`).

A fast tokenizer is not safe to share between threads (its Rust side raises "Already borrowed" when two calls
overlap), and the pipeline's own is in use by whichever generation holds the model: this keeps a copy of its
own, taken at the first count, used by one thread at a time.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTokens:
    count: int  # the prompt's tokens, its end token included
    limit: int  # the tokens the model reads (`ModelSpec.max_sequence_length`)
    cut: str | None  # the text past the limit, as the tokenizer decodes it; None when nothing is cut

    def as_dict(self) -> dict:
        return {"tokens": self.count, "max_tokens": self.limit, "cut": self.cut}


class PromptTokenCounter:
    """`count(text)` against `limit`, with a private copy of `tokenizer` (thread-safe)."""

    def __init__(self, tokenizer, limit: int):
        self._source = tokenizer
        self._tokenizer = None
        self._limit = limit
        self._lock = threading.Lock()

    def count(self, text: str) -> PromptTokens:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = copy.deepcopy(self._source)
            # verbose=False: transformers' "indexing errors" warning for a text longer than the model reads is this
            # module's very subject, not an error
            ids = self._tokenizer(text, add_special_tokens=True, verbose=False).input_ids
            cut = None
            if len(ids) > self._limit:
                cut = self._tokenizer.decode(ids[self._limit - 1:-1])
        return PromptTokens(count=len(ids), limit=self._limit, cut=cut)
