"""One model-family interface (`slapgen.models.family`): the trainer, engine, evaluation, sweep and the
service reach a model family only through it, and what it stores (spec files, latent-cache metadata)
stays readable for what was written before families existed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

# The family's own modules, and the registry that names each family once.
FAMILY_HOMES = {
    "slapgen/models/cogvideox.py",
    "slapgen/models/tiny.py",
    "slapgen/models/reference_configs.py",
    "slapgen/models/family.py",
}
# Benchmarks of CogVideoX-5B itself: random weights at its real config, its transformer fed by hand
# (RoPE, attention processors) or its VAE alone. Their training step goes through the family.
COGVIDEOX_BENCHMARKS = {"bench/serve.py", "bench/slot_rank.py", "bench/train_step.py"}
FAMILY_MODULE = "slapgen.models.cogvideox"
FAMILY_CLASS_PREFIXES = ("CogVideoX", "AutoencoderKLCogVideoX")
SCANNED = ("slapgen", "trainer", "bench", "service.py")


def _sources() -> list[Path]:
    files = []
    for top in SCANNED:
        path = REPO_ROOT / top
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    allowed = FAMILY_HOMES | COGVIDEOX_BENCHMARKS
    return [file for file in files if file.relative_to(REPO_ROOT).as_posix() not in allowed]


def _family_uses(tree: ast.AST) -> list[str]:
    """Imports of the CogVideoX module and of diffusers' CogVideoX classes (by import or attribute)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith(FAMILY_MODULE)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(FAMILY_MODULE):
                found.append(f"from {node.module}")
            elif node.module == "slapgen.models":
                found += [f"from slapgen.models import {a.name}" for a in node.names if a.name == "cogvideox"]
            elif node.module.split(".")[0] == "diffusers":
                found += [f"from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith(FAMILY_CLASS_PREFIXES)]
        elif isinstance(node, ast.Attribute) and node.attr.startswith(FAMILY_CLASS_PREFIXES):
            found.append(f".{node.attr}")
    return found


def test_only_the_family_modules_name_cogvideox():
    """Guards the family interface: a module outside CogVideoX's own files (cogvideox.py, the tiny model,
    the reference configs, the registry) that imports `slapgen.models.cogvideox` or names a diffusers
    CogVideoX class ties the trainer, engine, evaluation or a bench to one family; it must go through
    `family_of(spec)` instead. Fails on the code before the interface (14 modules imported it)."""
    offenders = {}
    for file in _sources():
        uses = _family_uses(ast.parse(file.read_text(), str(file)))
        if uses:
            offenders[file.relative_to(REPO_ROOT).as_posix()] = uses
    assert offenders == {}


def test_the_scan_sees_each_kind_of_use():
    """Guards the scan above against passing vacuously: each way of reaching CogVideoX is found."""
    code = ("import slapgen.models.cogvideox\nfrom slapgen.models.cogvideox import FRAME_STEP\n"
            "from slapgen.models import cogvideox\nfrom diffusers import CogVideoXPipeline\n"
            "import diffusers\ndiffusers.AutoencoderKLCogVideoX\nfrom diffusers.models import CogVideoXTransformer3DModel\n")
    assert len(_family_uses(ast.parse(code))) == 6


def test_a_spec_file_without_family_is_cogvideox(tmp_path):
    """Guards old `slap_spec.json` files (written before the `family` field): they still validate, as
    CogVideoX with its 8x/4x VAE and 2x2 patches, and the registry gives the CogVideoX family for them."""
    from slapgen.models.family import FAMILIES, family_of
    from slapgen.models.specs import COGVIDEOX_5B, SPEC_FILENAME, spec_for_folder

    old = COGVIDEOX_5B.model_dump()
    for field in ("family", "spatial_compression", "temporal_compression", "patch_size"):
        old.pop(field)
    (tmp_path / SPEC_FILENAME).write_text(json.dumps(old))
    spec = spec_for_folder(tmp_path, "anything")
    assert (spec.family, spec.size_multiple, spec.latent_frames(49)) == ("cogvideox", 16, 13)
    assert family_of(spec) is FAMILIES["cogvideox"]
    assert family_of(spec).latent_layout == "BFCHW" and family_of(spec).frame_axis == 1


def test_old_cache_metadata_reads_as_a_scaling_factor_and_new_per_channel_metadata_round_trips():
    """Guards the latent cache's metadata through the change to a general normalisation: an entry written
    before it (spatial, temporal, scaling factor only) reads as that scaling factor, unchanged keys are
    written for CogVideoX (so its cache keys and files are as before), and a per-channel normalisation
    (Wan's (x - mean[c]) / std[c]) round-trips and normalises as the formula written out here."""
    from slapgen.models.family import VaeFactors

    old = {"vae_spatial": "8", "vae_temporal": "4", "vae_scaling_factor": "0.7"}
    factors = VaeFactors.from_metadata(old)
    assert factors == VaeFactors(8, 4, 0.7) and factors.to_metadata() == old
    latents = torch.randn(1, 2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(factors.normalise(latents), latents * 0.7, rtol=0, atol=0)

    wan = VaeFactors.from_config({"scale_factor_spatial": 8, "scale_factor_temporal": 4,
                                  "latents_mean": [0.5, -1.0], "latents_std": [2.0, 4.0]})
    assert VaeFactors.from_metadata(wan.to_metadata()) == wan
    expected = torch.stack([(latents[:, 0] - 0.5) / 2.0, (latents[:, 1] + 1.0) / 4.0], dim=1)
    torch.testing.assert_close(wan.normalise(latents), expected)
    with pytest.raises(ValueError):
        VaeFactors.from_metadata({**old, "vae_latents_mean": "[1]", "vae_latents_std": "[1, 2]"})


def test_family_levels_and_inputs_are_cogvideoxs():
    """Guards the mapping the family-agnostic callers rely on for CogVideoX: held-out fractions 0.1..0.9 are
    timesteps 100..900 of 1000, TIC-FT buffers (249, 499, 749), and the family finds itself from its
    transformer's class (a peft or compiled wrapper included)."""
    from diffusers import CogVideoXDPMScheduler

    from slapgen.models.family import family_named, family_of_transformer
    from slapgen.models.tiny import build_tiny_pipeline

    family = family_named("cogvideox")
    scheduler = CogVideoXDPMScheduler(num_train_timesteps=1000)
    assert family.noise_levels((0.1, 0.3, 0.5, 0.7, 0.9), scheduler).tolist() == [100, 300, 500, 700, 900]
    assert family.ticft_buffer_levels(3, scheduler) == (249, 499, 749)
    transformer = build_tiny_pipeline().transformer
    assert family_of_transformer(transformer) is family
    with pytest.raises(ValueError):
        family_of_transformer(torch.nn.Linear(2, 2))
