"""Training: the loop, optimizer and schedule, losses, checkpoints, and parallelism applied from outside."""
