"""Randomly initialised Wan transformers and one denoising step's inputs, for the benchmarks.

`wan22-5b` is Wan 2.2 TI2V-5B's transformer at its real config (`slapgen.models.wan_configs`) and its
native size, 121 frames at 704x1280 (`slapgen.models.wan.WAN22_TI2V_5B`): its 16x VAE makes that 31 x 44 x
80 latents of 48 channels, 27,280 video tokens in 1x2x2 patches, against 512 UMT5 tokens. `tiny-wan22` is
the CPU dry run's stand-in: the tiny Wan with Wan 2.2's layout (16x VAE, per-token timesteps) at the tiny
spec's size. Weights are not needed to measure speed and memory; a VAE is not needed either (the step
takes latents, and training reads them from the latent cache), so none is built: only its config's
latent shape and normalisation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

WAN_BENCH_MODELS = ("wan22-5b", "tiny-wan22")


@dataclass(frozen=True)
class WanBenchSize:
    frames: int
    height: int
    width: int
    text_length: int
    vae_config: dict

    @property
    def resolution(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    def latent_shape(self, channels: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of one clip's latents (Wan's layout), by the VAE's factors."""
        from slapgen.models.family import latent_frames

        spatial = self.vae_config["scale_factor_spatial"]
        return (channels, latent_frames(self.frames, self.vae_config["scale_factor_temporal"]),
                self.height // spatial, self.width // spatial)


def wan_size(model: str) -> WanBenchSize:
    if model == "wan22-5b":
        from slapgen.models.wan import WAN22_TI2V_5B
        from slapgen.models.wan_configs import WAN22_VAE

        spec = WAN22_TI2V_5B
        return WanBenchSize(spec.max_num_frames, spec.height, spec.width, spec.max_sequence_length, WAN22_VAE)
    if model == "tiny-wan22":
        from slapgen.models.tiny_wan import TINY_WAN_SPEC

        spec = TINY_WAN_SPEC  # 64x96: multiples of 32, as the 16x VAE and 2x2 patches need
        return WanBenchSize(spec.default_num_frames, spec.height, spec.width, spec.max_sequence_length,
                            dict(_tiny_wan22().vae.config))
    raise SystemExit(f"unknown Wan benchmark model {model!r}: use one of {', '.join(WAN_BENCH_MODELS)}")


def wan_transformer(model: str, device: str, blocks: int | None = None, dtype: torch.dtype = torch.bfloat16):
    """A randomly initialised Wan transformer in `dtype` on `device` (optionally only its first `blocks`)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    if model == "wan22-5b":
        from slapgen.models.wan_configs import WAN22_TI2V_5B_TRANSFORMER

        config = dict(WAN22_TI2V_5B_TRANSFORMER)
    else:
        wan_size(model)  # the one error sentence for an unknown name
        config = dict(_tiny_wan22().transformer.config)
    if blocks:
        config["num_layers"] = blocks
    with torch.device(device):
        transformer = WanTransformer3DModel.from_config(config)
    transformer.to(device, dtype)
    # What `from_pretrained(..., dtype=bf16)` (the family's `load_transformer`) leaves in float32: the modules
    # the class lists, matched by a component of the parameter's name as diffusers matches them.
    keep = set(transformer._keep_in_fp32_modules or ())
    for name, parameter in transformer.named_parameters():
        if keep & set(name.split(".")):
            parameter.data = parameter.data.float()
    return transformer


def wan_all_blocks(model: str) -> int:
    if model == "wan22-5b":
        from slapgen.models.wan_configs import WAN22_TI2V_5B_TRANSFORMER

        return WAN22_TI2V_5B_TRANSFORMER["num_layers"]
    return _tiny_wan22().transformer.config.num_layers


@functools.cache
def _tiny_wan22():
    from slapgen.models.tiny_wan import build_tiny_wan_pipeline

    return build_tiny_wan_pipeline(vae="2.2")


def wan_step_inputs(transformer, model: str, device: str, batch: int = 2) -> dict:
    """One denoising step's transformer inputs at sigma 0.5. Classifier-free guidance as one batch of 2
    (`WanPipeline` makes two batch-1 calls: the same work). Timesteps per token, as `WanPipeline` builds them
    for Wan 2.2 TI2V-5B (`expand_timesteps`, `flow_matching.transformer_timestep`)."""
    from slapgen.models.flow_matching import transformer_timestep

    size = wan_size(model)
    config = transformer.config
    latents = torch.randn(batch, *size.latent_shape(config.in_channels), device=device, dtype=transformer.dtype)
    timestep = transformer_timestep(torch.full((batch,), 0.5), latents, config.patch_size, expand_timesteps=True)
    return {
        "hidden_states": latents,
        "encoder_hidden_states": torch.randn(batch, size.text_length, config.text_dim, device=device,
                                             dtype=transformer.dtype),
        "timestep": timestep,
        "return_dict": False,
    }
