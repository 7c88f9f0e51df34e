"""Training engine: trainer, checkpoints, distributed helpers, logging, per-sample records."""
