"""`data.trigger_word`: a word every training caption carries, so the LoRA's look is asked for by name.

The rule is like ai-toolkit's, which users of other trainers already write captions for: `[trigger]` in a
caption becomes the word; a caption that does not name the word (as a whole word) gets `WORD, ` in front
(ai-toolkit puts `WORD ` there and matches the word anywhere, inside longer words too). The same rule applies to
the run's validation prompts, its held-out captions (loss and, in `slapgen eval --trigger-word`, the prompts),
so every number of the run is measured on prompts like the ones it trained on."""

from __future__ import annotations

import re

PLACEHOLDER = "[trigger]"
MAX_LENGTH = 100


def check_trigger_word(word: str | None) -> str | None:
    """The word as a config or option holds it: stripped; empty means none. One sentence for anything else."""
    if word is None:
        return None
    word = word.strip()
    if not word:
        return None
    if any(char in word for char in "\r\n\t") or len(word) > MAX_LENGTH:
        raise ValueError(f"a trigger word is one line of at most {MAX_LENGTH} characters, not {word[:40]!r}")
    if PLACEHOLDER in word:
        raise ValueError(f"a trigger word cannot hold {PLACEHOLDER}, the placeholder it replaces")
    return word


def with_trigger_word(caption: str, word: str | None) -> str:
    """`caption` as the run trains on it: `[trigger]` replaced by `word`, or `word, ` in front when the caption
    does not already name it (as a whole word). Without a word the caption is unchanged."""
    if not word:
        return caption
    if PLACEHOLDER in caption:
        return caption.replace(PLACEHOLDER, word)
    if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", caption):
        return caption
    return f"{word}, {caption}" if caption else word
