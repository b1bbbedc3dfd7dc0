"""Where a launch's processes wait for work some of them do alone or longer: each process's share of the latent
cache (`cache_shares`), the main process's validation videos.

They waited in a collective of the launch's own process group, which NCCL ends after 10 minutes (torch's default
for it; gloo's is 30), crashing the launch: a few thousand clips encoded, or a handful of 5B validation videos,
take longer. These waits are in a gloo group of their own whose timeout is `LONG_WAIT`; training's collectives keep
NCCL's, which tells a hung step within minutes. One process: no group, and nothing to wait for. The price: a
process that hangs without ending (a stuck read of its share) holds the others that long; one that ends (a crash,
a kill) ends their wait at once, and torchrun then stops the launch. Across machines gloo connects on the address
the hostname resolves to: README says when to set GLOO_SOCKET_IFNAME.
"""

from __future__ import annotations

from datetime import timedelta

LONG_WAIT = timedelta(hours=72)


class LongWaits:
    def __init__(self, processes: int):
        self.processes = processes
        self._group = None
        if processes > 1:  # every process of the launch creates it, at the same point of its setup
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo", timeout=LONG_WAIT)

    def wait_for_everyone(self) -> None:
        if self._group is not None:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def gather(self, value) -> list:
        """Every process's `value`, in process order (a picklable object)."""
        if self._group is None:
            return [value]
        import torch.distributed as dist

        gathered: list = [None] * self.processes
        dist.all_gather_object(gathered, value, group=self._group)
        return gathered
