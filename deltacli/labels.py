"""Label conventions shared by data encoding, deltas and scoring."""

# The label of a token the loss does not see (PyTorch's cross-entropy `ignore_index`).
IGNORE = -100
