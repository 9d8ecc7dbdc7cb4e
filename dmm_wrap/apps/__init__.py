"""Applications built on the library: the synthetic digits job, run configs, evaluation, audit, report, sweep, CLI."""
