"""Building and running a training: models, optimizers, the loop, checkpoints and the run folder."""
