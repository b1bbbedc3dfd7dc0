"""What slapgen knows about its models: the model-family interface and registry (`family`), CogVideoX's
implementation of it (`cogvideox`), per-model limits (`specs`),
the tiny random twin (`tiny`), resolving and loading (`loading`), and the LoRA file format."""
