"""Shared runtime for the slapgen service and trainer: model specs, loading, the tiny model, video I/O."""
