"""`slapgen caption`: captions for clips that have none, from a video-language model."""
