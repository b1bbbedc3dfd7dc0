"""The trainer's errors: each a `SlapgenError` whose message is one line for the person at the terminal."""

import errno

from slapgen.errors import SlapgenError

# What no retry of the same write fixes, but space, a limit or a permission does: what to do about each. The one
# table for the CLI's line on any command (`cli.main`) and training's on a checkpoint (`checkpoints.stop_on_write_error`).
STORAGE_FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "raise the quota",
    errno.EFBIG: "write where larger files fit (FAT32 stops at 4 GiB; `ulimit -f` sets a limit too)",
    errno.EROFS: "make it writable",
    errno.EACCES: "check its permissions",
    errno.EIO: "check the disk it is on (full? a file-size limit?)",
}


class DatasetError(SlapgenError):
    """The dataset cannot be read as given (missing file, empty caption, wrong column, ...)."""


class ClipError(SlapgenError):
    """One clip cannot be used; training skips it and reports why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason  # short code: "corrupt" or "too_short"


class OutFolderError(SlapgenError):
    """A command's output folder is named where a file is."""


class TrainConfigError(SlapgenError):
    """A training configuration or override is invalid."""


class TrainError(SlapgenError):
    """Training cannot start or continue; the message says why."""


class EvalError(SlapgenError):
    """`slapgen eval` cannot run as asked (an adapter, a metric, a setting); the message says why."""


class SweepError(SlapgenError):
    """A sweep cannot start or continue as asked (bad grid, a folder that holds another sweep, a failed run)."""


class GenerateError(EvalError):
    """`slapgen generate` cannot run as asked (an option, a file, a mismatch); the message names the option."""


class ClusterError(SlapgenError):
    """A Ray cluster cannot be used as asked (none answers, no node has the GPUs, a folder not shared) by
    `slapgen sweep --ray` or `slapgen eval --ray`."""
