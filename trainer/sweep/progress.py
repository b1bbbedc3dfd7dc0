"""The sweep's one progress bar: optimizer steps of the whole sweep, which run (and step) is training,
and tqdm's ETA for everything left. Steps a rerun does not repeat (finished runs, the interrupted
run's checkpoint) count as done from the start, so the ETA is measured on this session's work. A run that
goes back to its checkpoint (its node was lost, or a rerun read the interrupted session's last logged step
before the resumed run cut its log back) steps again through steps the bar has counted: the bar counts each
step of a run once, the highest seen, so it never passes its total (it read "0% 2434/? steps" of 2400)."""

from __future__ import annotations

from trainer.progress import progress_bar
from trainer.sweep.grid import PlannedRun

# The counts and the ETA first, then what runs: tqdm cuts a line at the terminal's width from its end, and with
# three runs training their names took all 149 columns of a walk-through's terminal, percentage and ETA cut off.
BAR_FORMAT = "sweep: {percentage:3.0f}% {n_fmt}/{total_fmt} steps [{elapsed}, ETA {remaining}] | {desc}"
WAITING = "no run training just now"


class SweepProgress:
    def __init__(self, runs: list[PlannedRun], done: dict[str, int], enabled: bool = True):
        self.runs = {run.name: run for run in runs}
        self.position = {run.name: index + 1 for index, run in enumerate(runs)}
        self.at = dict(done)  # each run's step now
        self.counted = dict(done)  # each run's highest step: what the bar counts
        self.running: list[str] = []
        total = sum(run.config.train.max_train_steps for run in runs)
        self.bar = progress_bar(total=total, initial=sum(self.counted.values()), desc=WAITING, unit="step",
                                bar_format=BAR_FORMAT, disable=not enabled)

    def _label(self, name: str, named: bool = True) -> str:
        steps = self.runs[name].config.train.max_train_steps
        where = "evaluating" if self.at[name] >= steps else f"step {self.at[name]}/{steps}"
        return f"run {self.position[name]}/{len(self.runs)} {name} {where}" if named else \
            f"{name.split('-', 1)[0]} {where}"  # its folder's number: 00-learning_rate=1e-3_rank=4 is 00

    def step(self, name: str, step: int) -> None:
        """Run `name` is at optimizer step `step`."""
        self.at[name] = step
        delta = step - self.counted[name]
        self.counted[name] = max(step, self.counted[name])
        self._describe(refresh=delta <= 0)
        if delta > 0:
            self.bar.update(delta)  # draws the new description too

    def show(self, running: list[str]) -> None:
        """These runs are running now."""
        self.running = list(running)
        self._describe(refresh=True)

    def _describe(self, refresh: bool) -> None:
        self.bar.set_description_str(self.description(), refresh=refresh)

    def description(self) -> str:
        """One run by its position and name; several by their folders' numbers only (the names are the grid's
        settings, each a few dozen characters)."""
        if not self.running:
            return WAITING
        if len(self.running) == 1:
            return self._label(self.running[0])
        return f"{len(self.running)} runs training: " + ", ".join(self._label(name, named=False) for name in self.running)

    def say(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()
