"""slapgen's LoRA trainer for CogVideoX: datasets, latent cache, training loop, CLI."""
