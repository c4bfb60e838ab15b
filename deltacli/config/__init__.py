"""What a user writes: the recipe schema (typed fields, ranges, help) and its sections."""
