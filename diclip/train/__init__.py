"""Training: data positions and loading, the per-step trainer, DeepSpeed config. No Ray imports here."""
