"""What `slapgen` says of an option or a command it does not know: argparse named it and stopped ("unrecognized
arguments: --lr 1e-3"; "invalid choice: 'trian'" and every choice), or, for `--confg`, said only that `--config` was
missing.

`HintingParser` adds, for each option-like word the command does not have, the option spelt close to it, or for
another trainer's spelling of a setting (`--lr`, `--rank`, `--steps`) the `--set` that sets it.
"""

from __future__ import annotations

import argparse
import difflib
import sys

# Other trainers' options for what slapgen sets with --set: config keys (train, sweep, curate, precompute) ...
CONFIG_SETTINGS = {"lr": "optim.learning_rate", "learning-rate": "optim.learning_rate", "rank": "lora.rank",
                   "lora-rank": "lora.rank", "alpha": "lora.alpha", "lora-alpha": "lora.alpha",
                   "steps": "train.max_train_steps", "max-train-steps": "train.max_train_steps",
                   "batch-size": "train.batch_size", "train-batch-size": "train.batch_size",
                   "seed": "train.seed", "num-frames": "data.num_frames", "height": "data.height", "width": "data.width"}
# ... and generation settings (eval, generate).
GENERATION_SETTINGS = {"steps": "num_inference_steps", "num-inference-steps": "num_inference_steps",
                       "frames": "num_frames", "num-frames": "num_frames", "guidance": "guidance_scale",
                       "guidance-scale": "guidance_scale", "cfg": "guidance_scale", "height": "height", "width": "width",
                       "fps": "fps"}
GENERATION_COMMANDS = ("eval", "generate")


class HintingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors name, for each option it does not know, what was likely meant."""

    def parse_known_args(self, args=None, namespace=None):
        self._typed = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        hints = self._hints()
        # A mistyped command (`slapgen trian`, `slapgen campaign craete`): argparse lists the choices, names none.
        # The choices are the parser's own (argparse's wording of them differs between Python versions).
        if "invalid choice" in message:
            for action in self._actions:
                if isinstance(action, argparse._SubParsersAction):
                    words = [word for word in getattr(self, "_typed", None) or [] if not word.startswith("-")]
                    typed = next((word for word in words if word not in action.choices), None)
                    if typed is not None and (close := difflib.get_close_matches(typed, list(action.choices), n=1,
                                                                                    cutoff=0.6)):
                        hints.insert(0, f"{typed}: did you mean {close[0]}?")
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{'; ' if hints else ''}{'; '.join(hints)}\n")

    def _hints(self) -> list[str]:
        typed = getattr(self, "_typed", None) or []
        command, known = self._command_options(typed)
        hints = []
        for word in typed:
            option = word.split("=", 1)[0]
            if not option.startswith("--") or option in known or option == "--":
                continue
            settings = GENERATION_SETTINGS if command in GENERATION_COMMANDS else CONFIG_SETTINGS
            key = settings.get(option[2:].replace("_", "-"))
            if key is not None and "--set" in known:
                hints.append(f"{option}: slapgen {command} sets it with --set {key}=VALUE")
            elif close := difflib.get_close_matches(option, sorted(known), n=1, cutoff=0.7):
                hints.append(f"{option}: did you mean {close[0]}?")
        return hints

    def _command_options(self, typed: list[str]) -> tuple[str | None, set[str]]:
        """The subcommand `typed` names (the top-level parser's error, "unrecognized arguments") or this
        subcommand's own parser is (`slapgen train`'s prog), and the options it knows."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for word in typed:
                    if word in action.choices:
                        return word, set(action.choices[word]._option_string_actions)
        return self.prog.rsplit(" ", 1)[-1], set(self._option_string_actions)
