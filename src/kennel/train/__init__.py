"""The model and everything that fits it: arch and weights, batches, the loop, optimizer and schedule,
checkpoints, DDP, ``train()`` and the learning-rate finder. Knows nothing of MLflow."""
