"""Flat training scripts (`python -m train.sam`, `python -m train.demo`, ...) and what they share, a file per job:
`settings` (settings and their command line), `distributed` (torchrun), `run_folder` (start, resume, the run's
files), `loop` (schedule, precision, NaN guard, step), `report` (log, metrics, curves, skipped inputs),
`files` (atomic writes, checkpoints) and `script` (every script's `main`)."""
