"""Dataset curation: probe clips, check captions, flag problems, pick the best N, write a report."""

from trainer.curate.run import CurateSettings, curate

__all__ = ["CurateSettings", "curate"]
