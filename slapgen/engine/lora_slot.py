"""One hot-swappable LoRA slot on the transformer, so switching adapters never recompiles.

At start-up the slot is filled with an all-zero adapter of rank `max_rank` on every target module
(diffusers' `enable_lora_hotswap` pads later adapters to that rank and turns LoRA scalings into
tensors). Switching copies an adapter's weights into the slot in place with peft's hot-swap; the
base model and `adapter_scale` are expressed by filling the scaling tensors in place (0 = base
model). Shapes, dtypes and Python attributes the compiled graph guards on never change.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from slapgen.engine.adapters import LoadedAdapter
from slapgen.errors import AdapterError
from slapgen.models.lora_format import TRANSFORMER_PREFIX

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
        self.target_modules = tuple(target_modules)
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
        self._scale = 0.0
        self._set_scale(0.0)

    @property
    def holding(self) -> LoadedAdapter | None:
        """The adapter whose weights the slot holds and uses (None: the base model)."""
        return self._loaded if self.active is not None else None

    def activate(self, adapter: LoadedAdapter | None, scale: float = 1.0) -> None:
        """Put `adapter` (None: the base model) in effect at `scale`. Call only between generations.

        A swap that fails leaves the slot as it was (the previous adapter swapped back) and raises
        AdapterError: the next request, of any adapter or the base model, runs as before."""
        if adapter is None:
            self._set_scale(0.0)
            self.active = None
            return
        # Identity, not name: a deleted and re-uploaded adapter is a new object and is swapped in.
        if adapter is not self._loaded:
            try:
                self._swap_in(adapter)
            except Exception as error:
                self._restore()
                raise AdapterError(f"adapter {adapter.name} could not be swapped into the LoRA slot ({error}); "
                                   "nothing changed", field="adapter") from None
            self._loaded = adapter
            self.swaps += 1
        self._set_scale(scale)
        self.active = adapter.name

    def _swap_in(self, adapter: LoadedAdapter) -> None:
        """peft's hot-swap, called directly: diffusers' `load_lora_adapter` deletes the whole slot when a
        swap fails, which would break every later request."""
        from peft.utils.hotswap import check_hotswap_configs_compatible, hotswap_adapter_from_state_dict

        slot_config = self.transformer.peft_config[SLOT_NAME]
        # Dropout does nothing at inference; an adapter trained with some is as servable as one without.
        config = replace(adapter.config, lora_dropout=slot_config.lora_dropout)
        check_hotswap_configs_compatible(slot_config, config)
        state = {_slot_key(key): value for key, value in adapter.state_dict.items()}
        hotswap_adapter_from_state_dict(self.transformer, state, SLOT_NAME, config)
        # hotswap wrote alpha / rank into each scaling tensor; keep it as the 1.0 point.
        self._nominal = [float(layer.scaling[SLOT_NAME]) for layer in self._layers]

    def _restore(self) -> None:
        """Back to what the slot held before a failed swap: the previous adapter, or all zeros."""
        if self._loaded is not None:
            try:
                self._swap_in(self._loaded)
                self._set_scale(self._scale)
                return
            except Exception:  # it swapped in before; if it cannot now, fall back to the base model
                self._loaded = None
        with torch.no_grad():
            for layer in self._layers:
                layer.lora_A[SLOT_NAME].weight.zero_()
                layer.lora_B[SLOT_NAME].weight.zero_()
        self.active = None
        self._set_scale(0.0)

    def _set_scale(self, scale: float) -> None:
        self._scale = scale
        with torch.no_grad():
            for layer, nominal in zip(self._layers, self._nominal):
                layer.scaling[SLOT_NAME].fill_(nominal * scale)


def _slot_key(key: str) -> str:
    """`transformer.<module>.lora_A.weight` -> `<module>.lora_A.slot.weight`, the slot's parameter."""
    module_and_part = key.removeprefix(TRANSFORMER_PREFIX).removesuffix(".weight")
    return f"{module_and_part}.{SLOT_NAME}.weight"
