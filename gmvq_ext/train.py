"""``python -m gmvq_ext.train``: the same command as ``gmvq-train``
(gmvq_ext/cli/train.py; the loop itself is gmvq_ext/training/loop.py)."""

from .cli.train import main

if __name__ == "__main__":
    main()
