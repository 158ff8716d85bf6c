"""The seeded study: plans of claims x arms x seeds, runs, intervals and verdicts."""
