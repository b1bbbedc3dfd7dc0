"""One hot-swappable LoRA slot on the transformer, so switching adapters never recompiles.

At start-up the slot is filled with an all-zero adapter of rank `max_rank` on every target module
(diffusers' `enable_lora_hotswap` pads later adapters to that rank and turns LoRA scalings into
tensors). Switching copies an adapter's weights into the slot in place (`hotswap=True`); the base
model and `adapter_scale` are expressed by filling the scaling tensors in place (0 = base model).
Shapes, dtypes and Python attributes the compiled graph guards on never change.
"""

from __future__ import annotations

import torch

from slapgen.engine.adapters import LoadedAdapter

SLOT_NAME = "slot"


def lora_modules(transformer: torch.nn.Module, target_modules: list[str] | tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """The transformer's linear layers a LoRA with `target_modules` attaches to: name -> (in, out) features."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith(f".{t}") for t in target_modules)
    }


class LoraSlot:
    def __init__(self, transformer: torch.nn.Module, max_rank: int, target_modules: list[str] | tuple[str, ...]):
        self.transformer = transformer  # the module itself, not a compiled wrapper: swaps write into it
        self.max_rank = max_rank
        self._loaded: LoadedAdapter | None = None  # whose weights are in the slot
        self.active: str | None = None  # adapter in effect (None: base model)
        self.swaps = 0
        # module name -> (in, out) features: what an adapter may target (checked on upload).
        self.modules = lora_modules(transformer, target_modules)
        if not self.modules:
            raise ValueError(f"the transformer has no layers named {list(target_modules)} to hold a LoRA")
        zero_adapter = {}
        for name, (in_features, out_features) in self.modules.items():
            zero_adapter[f"transformer.{name}.lora_A.weight"] = torch.zeros(max_rank, in_features)
            zero_adapter[f"transformer.{name}.lora_B.weight"] = torch.zeros(out_features, max_rank)
        transformer.enable_lora_hotswap(target_rank=max_rank)
        transformer.load_lora_adapter(zero_adapter, prefix="transformer", adapter_name=SLOT_NAME)
        self._layers = [m for m in transformer.modules() if SLOT_NAME in getattr(m, "scaling", {})]
        self._nominal = [float(layer.scaling[SLOT_NAME]) for layer in self._layers]
        self._set_scale(0.0)

    def activate(self, adapter: LoadedAdapter | None, scale: float = 1.0) -> None:
        """Put `adapter` (None: the base model) in effect at `scale`. Call only between generations."""
        if adapter is None:
            self._set_scale(0.0)
            self.active = None
            return
        # Identity, not name: a deleted and re-uploaded adapter is a new object and is swapped in.
        if adapter is not self._loaded:
            self.transformer.load_lora_adapter(
                dict(adapter.state_dict), prefix="transformer", adapter_name=SLOT_NAME,
                metadata=adapter.diffusers_metadata, hotswap=True,
            )
            # hotswap wrote alpha / rank into each scaling tensor; keep it as the 1.0 point.
            self._nominal = [float(layer.scaling[SLOT_NAME]) for layer in self._layers]
            self._loaded = adapter
            self.swaps += 1
        self._set_scale(scale)
        self.active = adapter.name

    def _set_scale(self, scale: float) -> None:
        with torch.no_grad():
            for layer, nominal in zip(self._layers, self._nominal):
                layer.scaling[SLOT_NAME].fill_(nominal * scale)
