"""The training step (trainer), the run loop, EMA and standing statistics, and checkpoints."""
