"""What each command does beyond training (eval, inspect, merge, verify, sparsify,
subspace, sweep, report), as library calls the CLI wraps."""
