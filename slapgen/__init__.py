"""slapgen: teach CogVideoX a new video domain with LoRA and serve it.

- `slapgen.models`: what is specific to CogVideoX (the model home), specs, the tiny model, loading.
- `slapgen.engine`: the generation engine (pipeline, LoRA slot, quantisation, compile, generate).
- `slapgen.serving`: the HTTP side of the BentoML service (settings, request schemas, routes, jobs).
The trainer (`trainer/`) imports `slapgen.models`; the service imports `slapgen.engine` and
`slapgen.serving`. Nothing here imports the trainer.
"""
