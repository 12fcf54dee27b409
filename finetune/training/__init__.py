"""LoRA training: the config, its phases (setup, model, step, validation, checkpoints, results), the caches and feeds, LoRA files, and the hyperparameter search."""
