"""The process and its machine: process groups, signals and exit codes, progress bars, and the
benchmarks' shared timing."""
