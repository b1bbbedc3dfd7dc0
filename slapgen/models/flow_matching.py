"""The rectified-flow (flow-matching) training objective, as Wan is trained, in plain functions.

A clean latent x0 and Gaussian noise n meet on a straight line: x_sigma = (1 - sigma) x0 + sigma n, with
sigma in [0, 1] (0 clean, 1 pure noise). The transformer is told timestep = sigma * 1000 and predicts
the line's velocity n - x0; the loss is the mean squared error against it, with weight 1. This is
what diffusers' `FlowMatchEulerDiscreteScheduler.scale_noise` noises with, what finetrainers'
`flow_match_xt` / `flow_match_target` compute (`finetrainers/functional/diffusion.py`) and what
TIC-FT's Wan training forward runs (`finetrainers/models/wan/base_specification.py` L477-513).

Latents here are laid out as Wan's transformer takes them: (batch, channels, frames, height, width).

TIC-FT on flow matching (`FlowFramePlan`, `buffer_sigmas`): condition frames are clean (sigma 0: x_0 is
x0 bit for bit), buffer k sits at min(sigma, (k + 1) / (B + 1)) (0.25 / 0.5 / 0.75 for three buffers,
TIC-FT's Wan levels, base_specification.py L487-497), target frames at sigma, and the loss covers the
target frames only. The layout and inference re-injection are family-agnostic (`slapgen.models.ticft`,
through `WanFamily`'s TIC-FT members).

Nothing here loads a model or names a model family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch  # imported where used: a typo check must not wait for torch


FRAME_DIM = 2  # (B, C, F, H, W)
NUM_TRAIN_TIMESTEPS = 1000  # timestep = sigma * 1000, as Wan's schedulers (num_train_timesteps=1000) tell the transformer

SigmaSampling = Literal["logit_normal", "uniform"]


@dataclass(frozen=True)
class SigmaDraw:
    """How a training step draws its sigmas (`sample_sigmas`' options); the default is TIC-FT's released Wan recipe."""

    scheme: SigmaSampling = "logit_normal"
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return sample_sigmas(batch, generator, self.scheme, self.shift, self.logit_mean, self.logit_std)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift, shift s / (1 + (shift - 1) s): diffusers' `FlowMatchEulerDiscreteScheduler`
    (static shift) and UniPC's `flow_shift` move sigmas the same way; shift 1 leaves them as they are."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch: int, generator: torch.Generator, scheme: SigmaSampling = "logit_normal", shift: float = 1.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """One sigma per sample, (batch,) float32 on the generator's device.

    Default: logit-normal(0, 1), shift 1. That is the released TIC-FT Wan recipe (`scripts/wan/P2V/train.sh`
    `--flow_weighting_scheme logit_normal` over `FlowMatchEulerDiscreteScheduler()`, whose shift is 1;
    finetrainers `compute_density_for_timestep_sampling`, itself diffusers' SD3 training script's, SD3
    paper sec. 3.1): it puts most draws near sigma 0.5, where the velocity is hardest to predict. `shift`
    > 1 moves draws toward noise as Wan's inference schedule does (musubi-tuner trains Wan with its
    "shift" sampling at 3.0); `uniform` is plain U(0, 1)."""
    import torch
    device = generator.device
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, (batch,), generator=generator, device=device))
    elif scheme == "uniform":
        u = torch.rand((batch,), generator=generator, device=device)
    else:
        raise ValueError(f"sigma sampling must be logit_normal or uniform, got {scheme!r}")
    return shift_sigmas(u.float(), shift)


def broadcast_sigmas(sigmas: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample or (B, F) per-frame sigmas shaped to multiply (B, C, F, H, W) latents."""
    if sigmas.ndim == 1:
        return sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.device, latents.dtype)
    if sigmas.ndim == 2:
        return sigmas.view(sigmas.shape[0], 1, sigmas.shape[1], 1, 1).to(latents.device, latents.dtype)
    raise ValueError(f"sigmas must be (batch,) or (batch, frames), got shape {tuple(sigmas.shape)}")


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma n; a frame at sigma 0 is x0 exactly."""
    sigma = broadcast_sigmas(sigmas, latents)
    return (1 - sigma) * latents + sigma * noise.to(latents.dtype)


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer learns to predict: d x_sigma / d sigma = n - x0."""
    return noise.to(latents.dtype) - latents


def transformer_timestep(sigmas: torch.Tensor, latents: torch.Tensor, patch_size, expand_timesteps: bool,
                         num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The `timestep` a Wan transformer gets for samples at `sigmas` (B,): sigma * 1000 as (B,), or, for a
    model trained with one timestep per latent token (Wan 2.2 TI2V, `expand_timesteps`), the same value
    repeated over the (frames x height/2 x width/2) tokens, (B, tokens), as `WanPipeline.__call__` builds it."""
    timesteps = sigmas.float() * num_train_timesteps
    if not expand_timesteps:
        return timesteps.to(latents.device)
    _, _, frames, height, width = latents.shape
    tokens = (frames // patch_size[0]) * (height // patch_size[1]) * (width // patch_size[2])
    return timesteps.to(latents.device).view(-1, 1).expand(-1, tokens)


@dataclass(frozen=True)
class FlowFramePlan:
    """Per-latent-frame noise of one batch: each frame's sigma (B, F), 0 for a frame kept clean, and the
    frames the loss covers. The transformer still gets the sample's sigma."""

    frame_sigmas: torch.Tensor
    loss_frames: slice


def buffer_sigmas(buffer: int) -> tuple[float, ...]:
    """Each TIC-FT buffer's fixed sigma, nearest the condition first: (0.25, 0.5, 0.75) for 3 buffers."""
    return tuple((k + 1) / (buffer + 1) for k in range(buffer))


def flow_matching_loss(transformer, latents: torch.Tensor, prompt_embeds: torch.Tensor, noise: torch.Tensor,
                       sigmas: torch.Tensor, frame_plan: FlowFramePlan | None = None,
                       expand_timesteps: bool = False,
                       num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The flow-matching loss of one batch: `latents` normalised, (B, C, F, H, W); `sigmas` (B,); the
    transformer is told sigma x `num_train_timesteps` (the scheduler's count).

    With a `frame_plan` each frame is noised at its own sigma and only `loss_frames` count; the
    transformer is told the sample's sigma (TIC-FT's rule, base_specification.py L500).

    x_sigma and the target are formed in float32 and x_sigma is cast to the prompt embeddings' dtype (the
    transformer's) only then, as finetrainers' `flow_match_xt` does: in bf16 the line would be drawn at a
    rounded sigma (0.7123 -> 0.7109) while the transformer is told the exact one."""
    batch = latents.shape[0]
    latents, noise = latents.float(), noise.float()
    frame_sigmas = sigmas if frame_plan is None else frame_plan.frame_sigmas
    noisy = noisy_latents(latents, noise, frame_sigmas.float()).to(prompt_embeds.dtype)
    patch_size = transformer.config.patch_size if expand_timesteps else None  # (not read through a DDP wrapper)
    timestep = transformer_timestep(sigmas, latents, patch_size, expand_timesteps, num_train_timesteps)
    prediction = transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=prompt_embeds,
                             return_dict=False)[0]
    error = (prediction.float() - velocity_target(latents, noise)) ** 2
    if frame_plan is not None:
        error = error[:, :, frame_plan.loss_frames]
    return error.reshape(batch, -1).mean(dim=1).mean()
