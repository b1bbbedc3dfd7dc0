"""The generation engine: load a pipeline, add the hot-swap LoRA slot, quantise, compile, generate.

It takes plain parameter objects and raises `slapgen.errors` exceptions; it knows nothing of HTTP."""
