"""The process and its machine: process groups, signals and exit codes, progress bars, and
what torch can use of the GPUs."""
