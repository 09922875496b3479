"""Training machinery: one loop (``fit``), optimizer groups, lr schedule, checkpoints, distributed setup."""
