"""The training run of ``gmvq-train``: ``loop.py`` reads top to bottom; the
mechanics live beside it, one concern per file (configuration and flags,
checkpoints, resuming, stopping on a signal, the step's metrics on the
device, the learning-rate schedule, data order, evaluation metrics, the
process group, pictures)."""
