"""`slapgen sweep`: train every combination of a grid of config values, judge each (with --checkpoints,
each of its checkpoints) on held-out loss and the metrics asked, report the best by --pick-by. Start reading at `sweep.py`; this package imports nothing heavy by itself."""
