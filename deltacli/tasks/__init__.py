"""What a model learns: the task registry, each task's data (tables, classification
encoding, generative records), the metric registry, scoring and the evaluation loop."""
