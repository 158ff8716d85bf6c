"""The process and its machine: process groups, signals, progress bars."""
