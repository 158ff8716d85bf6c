"""The exit codes of `powergrad train` that a job script, `powergrad torchrun` and the study's
runner act on, beside 0 (trained to the end), 1 (a bug, with its traceback) and 2 (a recipe,
data or run-folder error, one line)."""

EXIT_DIVERGED = 3  # NaN or inf in the loss, the weights or the evaluation: nothing saved of it
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: neither success nor failure; run the command again
