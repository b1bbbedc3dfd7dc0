import numpy as np
import pytest

from slapgen.video import read_mp4, write_mp4


def test_mp4_round_trip_keeps_count_size_and_fps(tmp_path):
    rng = np.random.default_rng(0)
    # Smooth content survives H.264 well enough to compare means.
    frames = np.broadcast_to(np.linspace(0, 1, 7)[:, None, None, None], (7, 32, 48, 3)).copy()
    frames += rng.uniform(-0.02, 0.02, frames.shape)
    path = write_mp4(np.clip(frames, 0, 1), tmp_path / "clip.mp4", fps=8)
    decoded, fps = read_mp4(path)
    assert decoded.shape == (7, 32, 48, 3) and decoded.dtype == np.uint8
    assert fps == pytest.approx(8)
    assert np.abs(decoded.mean(axis=(1, 2, 3)) / 255 - frames.mean(axis=(1, 2, 3))).max() < 0.05


def test_write_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="F, H, W, 3"):
        write_mp4(np.zeros((4, 32, 32)), tmp_path / "x.mp4", fps=8)
