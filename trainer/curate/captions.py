"""Caption checks: length, garbage (loops, refusals, non-words, off-topic), motion categories,
outcome labels (clean strike, knockout, block/absorb, foul, miss), the four aspects a good caption covers (research notes), and a score.

Plain keyword rules on purpose: they are fast on thousands of captions, need no model, and a user
can read exactly why a caption was tagged or flagged.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

MIN_WORDS, MAX_WORDS = 50, 100

CATEGORIES: dict[str, tuple[str, ...]] = {
    "face-off": ("face off", "faces off", "face-off", "squared up", "square up", "stare", "stand across"),
    "wind-up": ("winds up", "wind up", "wind-up", "draws his", "draws back", "drawing his", "loads", "cocks"),
    "strike": ("strike", "strikes", "slap", "slaps", "palm", "lands", "hits", "open hand", "open-hand"),
    "block-absorb": ("absorb", "absorbs", "braces", "takes the blow", "takes the hit", "block", "tucks his chin"),
    "stagger": ("stagger", "staggers", "wobble", "wobbles", "buckle", "buckles", "buckling", "stumble", "sways"),
    "knockout": ("knockout", "knocked out", "knocks out", "collapses", "out cold", "goes limp", "falls to"),
    "referee": ("referee", "official", "waves off", "wave-off", "wave off"),
    "replay-slow-motion": ("slow motion", "slow-motion", "replay", "slowed"),
}

# How the exchange ends. A caption can carry several (a clean strike the defender absorbs).
OUTCOMES: dict[str, tuple[str, ...]] = {
    "clean-strike": ("clean strike", "clean slap", "lands flush", "flush", "connects", "lands cleanly", "lands square",
                     "strikes the cheek", "strikes his cheek", "lands on the cheek", "lands on his cheek", "full force"),
    "knockout": CATEGORIES["knockout"],
    "block-absorb": ("absorb", "absorbs", "takes the blow", "takes the hit", "braces", "holds his ground", "block",
                     "blocks", "tucks his chin", "stays on his feet", "shakes it off", "resets his stance"),
    "foul": ("foul", "illegal", "heel of the hand", "clubbing", "flinch", "flinches", "warning", "warns",
             "point deduction", "deducts", "disqualified", "disqualification"),
    "miss": ("miss", "misses", "missed", "whiff", "whiffs", "fails to connect", "failed strike", "falls short",
             "grazes", "glances off", "barely connects", "only grazes"),
}
# Failed strikes and defensive moves: what `--hard-negatives` reserves part of a selection for.
HARD_NEGATIVES = ("miss", "foul", "block-absorb")

ASPECTS: dict[str, tuple[str, ...]] = {
    "motion": ("swing", "swings", "whips", "snaps", "rotates", "fast", "explosive", "motion", "speed", "jerks",
               "lurch", "rushes", "moves", "sudden", "recoil", "follows through"),
    "positioning": ("stance", "feet", "foot", "weight", "plants", "shifts", "legs", "hips", "leans", "across",
                    "left", "right", "position", "steps"),
    "impact": ("impact", "ripple", "ripples", "deform", "force", "contact", "crack", "flush", "strikes", "lands",
               "recoil", "sweat"),
    "camera": ("camera", "shot", "close-up", "close up", "wide", "pans", "pan ", "tracks", "zoom", "angle",
               "frame", "frames", "footage", "handheld", "static"),
}

REFUSALS = ("i'm sorry", "i am sorry", "as an ai", "language model", "i cannot", "i can't", "i can not",
            "unable to", "i apologize", "cannot assist", "can't help", "not able to view", "i don't have access")

# Words of what one sees in a video: a caption with none of them is not describing footage.
VISUAL_WORDS = {
    "man", "men", "woman", "person", "people", "athlete", "athletes", "fighter", "fighters", "striker", "defender",
    "opponent", "referee", "crowd", "face", "head", "hand", "hands", "arm", "arms", "cheek", "jaw", "body",
    "table", "stage", "arena", "ring", "camera", "shot", "frame", "scene", "video", "clip", "slap", "strike",
    "stands", "stand", "swings", "moves", "looks", "shirt", "background", "light", "lights",
}

WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
TOKEN = re.compile(r"\S+")


@dataclass
class CaptionReport:
    words: int = 0
    characters: int = 0
    issues: list[str] = field(default_factory=list)
    garbage_reasons: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    aspects: list[str] = field(default_factory=list)
    score: float = 0.0


def _has(text: str, phrases: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![a-z]){re.escape(p.strip())}(?![a-z])", text) for p in phrases)


def garbage_reasons(caption: str) -> list[str]:
    lower = caption.lower()
    tokens = TOKEN.findall(lower)
    words = WORD.findall(lower)
    reasons = []
    if any(phrase in lower for phrase in REFUSALS):
        reasons.append("refusal")
    if tokens:
        real = [t for t in tokens if WORD.fullmatch(t.strip(".,;:!?\"()")) and re.search(r"[aeiouy]", t)]
        if len(real) / len(tokens) < 0.6:
            reasons.append("mostly non-words")
    if len(words) >= 12:
        trigrams = Counter(zip(words, words[1:], words[2:]))
        if trigrams.most_common(1)[0][1] >= 3 or len(set(words)) / len(words) < 0.3:
            reasons.append("repetition loop")
    if words and not VISUAL_WORDS.intersection(words):
        reasons.append("does not describe a video")
    return reasons


def check_caption(caption: str | None) -> CaptionReport:
    if caption is None or not caption.strip():
        return CaptionReport(issues=["caption_missing"])
    text = " ".join(caption.split())
    lower = text.lower()
    report = CaptionReport(words=len(text.split()), characters=len(text))
    if report.words < MIN_WORDS:
        report.issues.append("caption_too_short")
    if report.words > MAX_WORDS:
        report.issues.append("caption_too_long")
    report.garbage_reasons = garbage_reasons(text)
    if report.garbage_reasons:
        report.issues.append("caption_garbage")
    report.categories = [name for name, phrases in CATEGORIES.items() if _has(lower, phrases)]
    report.outcomes = outcome_labels(lower)
    report.aspects = [name for name, phrases in ASPECTS.items() if _has(lower, phrases)]
    report.score = caption_score(report)
    return report


def outcome_labels(lower: str) -> list[str]:
    """Outcome labels of a lower-cased caption; a strike that missed or was a foul is not clean."""
    labels = [name for name, phrases in OUTCOMES.items() if _has(lower, phrases)]
    if "miss" in labels or "foul" in labels:
        labels = [label for label in labels if label != "clean-strike"]
    return labels


def caption_score(report: CaptionReport) -> float:
    """0-1: 40% length (1 inside 50-100 words, falling off outside), 60% aspect coverage; 0 when flagged."""
    if report.issues:
        return 0.0
    if report.words < MIN_WORDS:
        length = report.words / MIN_WORDS
    elif report.words > MAX_WORDS:
        length = max(0.0, 1 - (report.words - MAX_WORDS) / MAX_WORDS)
    else:
        length = 1.0
    return round(0.4 * length + 0.6 * len(report.aspects) / len(ASPECTS), 4)
