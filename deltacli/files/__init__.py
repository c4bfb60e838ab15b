"""Files on disk at their lowest level: reading the text files users hand deltacli, writing
safetensors so that a full disk is an `OSError`, and output folders that are never
half-written or someone else's."""
