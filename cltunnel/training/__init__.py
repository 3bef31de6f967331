"""Training: Avalanche strategies on cltunnel's device data path, tunnel-aware plugins, checkpoints (data,
not code), evaluation and the task-sequence loop."""
