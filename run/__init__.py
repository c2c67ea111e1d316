"""A run: its configuration (RunConfig, Counts and their named presets) and its Layout, the one place
that names every path a run reads or writes. Sits above engine/ (profiles) and below everything else."""
