"""What slapgen knows about its models: CogVideoX's maths (`cogvideox`), per-model limits (`specs`),
the tiny random twin (`tiny`), resolving and loading (`loading`), and the LoRA file format."""
