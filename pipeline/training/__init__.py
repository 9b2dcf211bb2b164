"""One run's training: losses, optimizers and schedules, the loop and its steps, SWA averaging."""
