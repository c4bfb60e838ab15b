"""Saved deltas: the delta folder (tensors, recipe, metrics), PEFT's format, the model card."""
