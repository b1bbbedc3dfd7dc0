"""A small synthetic Power Slap dataset: two figures, a wind-up, an open-hand strike, a recoil.

The clips are drawn procedurally (no downloads) so tests and the quick start have real mp4 files
and captions written the way our research notes ask: 50-100 words covering motion dynamics,
stance and weight transfer, impact physics and the camera.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slapgen.video import write_mp4
from trainer.errors import DatasetError

HEIGHT, WIDTH, FPS, SECONDS = 144, 224, 16, 2.5
COLOURS = {"red": (0.85, 0.15, 0.12), "blue": (0.15, 0.3, 0.85), "black": (0.08, 0.08, 0.08), "white": (0.92, 0.92, 0.9)}
OUTCOMES = ("absorbs", "staggers", "knockout")
CAMERAS = ("static", "pan")


@dataclass(frozen=True)
class DemoClip:
    striker_on_left: bool
    striker_colour: str
    defender_colour: str
    outcome: str
    camera: str
    backdrop: float  # gym lighting; also keeps two clips with the same choices from being identical
    # Motion knobs (bench/duplicates.py varies them to draw other footage of the same scene layout).
    impact: float = 0.55  # when the palm lands, as a fraction of the clip
    spacing: float = 38.0  # each athlete's distance from the table's centre, pixels
    reach: float = 34.0  # arm length, pixels
    # The venue: banners on the back wall, (x, y, width, height, (r, g, b)) in pixels of the frame; they
    # pan with the camera (bench/duplicates.py gives every bout its own, as real arenas differ).
    banners: tuple = ()


def _window(canvas, y_low, y_high, x_low, x_high):
    """The canvas rows/columns that can hold a shape within these bounds (drawing only there is
    what keeps a frame at a fraction of a millisecond), as open grids plus the view."""
    top, left = max(0, math.floor(y_low)), max(0, math.floor(x_low))
    bottom, right = min(canvas.shape[0], math.ceil(y_high) + 1), min(canvas.shape[1], math.ceil(x_high) + 1)
    yy, xx = np.ogrid[top:bottom, left:right]
    return yy, xx, canvas[top:bottom, left:right]


def _disc(canvas, cy, cx, radius, colour):
    yy, xx, view = _window(canvas, cy - radius, cy + radius, cx - radius, cx + radius)
    view[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = colour


def _segment(canvas, y0, x0, y1, x1, thickness, colour):
    yy, xx, view = _window(canvas, min(y0, y1) - thickness, max(y0, y1) + thickness,
                           min(x0, x1) - thickness, max(x0, x1) + thickness)
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
    view[(yy - (y0 + t * dy)) ** 2 + (xx - (x0 + t * dx)) ** 2 <= thickness**2] = colour


def _figure(canvas, x, lean, colour, head_shift=0.0, drop=0.0):
    floor = HEIGHT * 0.92
    hip_y, shoulder_y = floor - 40 + drop, floor - 78 + drop
    _segment(canvas, floor, x - 8, hip_y, x, 4, (0.2, 0.2, 0.25))  # legs
    _segment(canvas, floor, x + 8, hip_y, x, 4, (0.2, 0.2, 0.25))
    _segment(canvas, hip_y, x, shoulder_y, x + lean, 9, colour)  # torso
    _disc(canvas, shoulder_y - 12, x + lean + head_shift, 10, (0.93, 0.75, 0.6))  # head
    return shoulder_y, x + lean


def render_frame(clip: DemoClip, t: float) -> np.ndarray:
    """The scene at time t in [0, 1]: face-off, wind-up, strike at `clip.impact`, recoil, outcome."""
    pan = 12 * math.sin(t * math.pi) if clip.camera == "pan" else 0.0
    canvas = np.empty((HEIGHT, WIDTH, 3), dtype=np.float32)
    canvas[:] = np.linspace(clip.backdrop, clip.backdrop + 0.25, HEIGHT)[:, None, None] * np.array([0.9, 0.85, 0.8])
    for x, y, width, height, colour in clip.banners:
        left, right = max(0, int(x + pan)), min(WIDTH, int(x + width + pan))
        canvas[int(y) : int(y + height), left:right] = colour
    canvas[int(HEIGHT * 0.62) : int(HEIGHT * 0.68), int(WIDTH * 0.38 + pan) : int(WIDTH * 0.62 + pan)] = (0.45, 0.3, 0.2)
    side = 1 if clip.striker_on_left else -1
    striker_x = WIDTH / 2 - side * clip.spacing + pan
    defender_x = WIDTH / 2 + side * clip.spacing + pan
    impact = clip.impact
    after = max(0.0, t - impact)
    head_snap = side * 14 * math.exp(-after * 12) * (after > 0) * (2.0 if clip.outcome == "knockout" else 1.0)
    drop = {"absorbs": 0.0, "staggers": 6.0, "knockout": 30.0}[clip.outcome] * min(1.0, after * 3)
    stagger = side * {"absorbs": 0.0, "staggers": 10.0, "knockout": 16.0}[clip.outcome] * min(1.0, after * 3)
    _figure(canvas, defender_x + stagger, side * 2, COLOURS[clip.defender_colour], head_snap, drop)
    weight = -side * 6 * min(1.0, t / 0.4) if t < impact else side * 6
    shoulder_y, shoulder_x = _figure(canvas, striker_x, weight, COLOURS[clip.striker_colour])
    wind_up, swing = impact - 0.40, impact - 0.10
    if t < wind_up:
        angle = math.pi / 2  # arm hangs: face-off
    elif t < swing:
        angle = math.pi / 2 + (t - wind_up) / 0.30 * math.pi * 0.75  # wind-up, arm drawn back
    elif t < impact:
        angle = math.pi * 1.25 - (t - swing) / (impact - swing) * math.pi * 1.25  # fast swing
    else:
        angle = -0.15 + after * 2.0  # follow-through
    hand_y = shoulder_y + clip.reach * math.sin(angle)
    hand_x = shoulder_x + side * clip.reach * math.cos(angle)
    _segment(canvas, shoulder_y, shoulder_x, hand_y, hand_x, 4, COLOURS[clip.striker_colour])
    _disc(canvas, hand_y, hand_x, 5, (0.93, 0.75, 0.6))
    if impact <= t < impact + 0.06:
        _disc(canvas, shoulder_y - 12, defender_x - side * 8, 16, (1.0, 1.0, 0.85))  # impact flash
    return np.clip(canvas, 0, 1)


def caption_for(clip: DemoClip) -> str:
    striker = f"the athlete in the {clip.striker_colour} shirt"
    defender = f"the athlete in the {clip.defender_colour} shirt"
    side = "left" if clip.striker_on_left else "right"
    outcome = {
        "absorbs": f"{defender.capitalize()} absorbs the blow and resets his stance.",
        "staggers": f"{defender.capitalize()} staggers sideways, knees buckling, then regains his balance.",
        "knockout": f"{defender.capitalize()} collapses and the referee waves off the bout.",
    }[clip.outcome]
    camera = {
        "static": "A static wide camera frames both athletes and the table.",
        "pan": "The camera pans slowly across the table, following the swing of the arm.",
    }[clip.camera]
    return (
        f"Power slap: two athletes face off across the table. On the {side}, {striker} plants his feet, "
        "shifts his weight back and winds up, drawing his open hand far back, then rotates his hips and "
        "whips the arm forward. The palm strikes the cheek with a loud impact and the head snaps sideways. "
        f"{outcome} {camera}"
    )


def write_demo_dataset(out: Path, clips: int = 8, seed: int = 0) -> list[Path]:
    """Write `clips` synthetic clips + captions as `clip_NNN.mp4` / `clip_NNN.txt` under `out`; returns the clips
    written. A clip whose two files are there already is kept as it is: a rerun overwrote captions edited by hand."""
    from trainer.progress import progress_bar

    check_demo_target(out, clips)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    frame_count = int(FPS * SECONDS)
    written = []
    for index in progress_bar(range(clips), desc="demo clips", unit="clip"):
        striker_colour, defender_colour = rng.sample(sorted(COLOURS), 2)
        clip = DemoClip(
            striker_on_left=rng.random() < 0.5,
            striker_colour=striker_colour,
            defender_colour=defender_colour,
            outcome=OUTCOMES[index % len(OUTCOMES)],
            camera=rng.choice(CAMERAS),
            backdrop=round(rng.uniform(0.25, 0.45), 3),
        )
        path = out / f"clip_{index:03d}.mp4"
        if path.is_file() and path.with_suffix(".txt").is_file():
            continue  # the scene was still drawn above: the clips after it are the same either way
        frames = np.stack([render_frame(clip, i / (frame_count - 1)) for i in range(frame_count)])
        write_mp4(frames, path, fps=FPS)
        path.with_suffix(".txt").write_text(caption_for(clip) + "\n", encoding="utf-8")
        written.append(path)
    return written


def check_demo_target(out: Path, clips: int) -> None:
    """DatasetError for what demo-data cannot do: fewer than 1 clip (a traceback); a target that is a file is the
    CLI's rule for every command's output folder (`cli.check_out_is_a_folder`)."""
    if clips < 1:
        raise DatasetError(f"--clips must be at least 1, got {clips}")
