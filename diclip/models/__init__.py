"""Model wrappers: open_clip CLIP with VCE, diffusers attention capture, KV adapter, segmenter."""
