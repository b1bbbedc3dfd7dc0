"""`slapgen sweep`: train every combination of a grid of config values, judge each on held-out loss,
report the best. Start reading at `sweep.py`; this package imports nothing heavy by itself."""
