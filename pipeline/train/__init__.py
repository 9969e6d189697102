"""Training on Ray Train: the driver, the worker loop, the Ray-free step, optimiser and checkpoints."""
