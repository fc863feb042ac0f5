"""Helpers for ``python -m gmvq_ext.train``: configuration, schedule, data order,
checkpoints, distributed plumbing, evaluation and pictures. ``train.py`` reads
top to bottom; the mechanics live here, one concern per file."""
