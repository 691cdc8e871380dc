"""Which parameters train: freeze rules and presets, the trainable/frozen split, LoRA."""
