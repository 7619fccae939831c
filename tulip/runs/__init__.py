"""What a run leaves behind: the run folder (atomic files, lock, checkpoints, summary), the metric
keys every file and table uses, and W&B tracking. Knows nothing of models or training."""
