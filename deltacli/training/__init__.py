"""Training: the accelerate runtime, the trainer, a run's folder and its resumable
checkpoints, stop signals, logs."""
