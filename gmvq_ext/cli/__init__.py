"""The command lines, one module each, named as their console scripts:

    gmvq-train      cli/train.py     (also ``python -m gmvq_ext.train``)
    gmvq-evaluate   cli/evaluate.py
    gmvq-tokenize   cli/tokenize.py
    gmvq-export     cli/export.py

Each module's ``main(argv=None)`` parses the arguments, runs, returns its
results (for tests and notebooks) and turns the errors a user can cause into a
one-line ``SystemExit``; its ``command()`` is the console script, which
returns nothing (a script's exit status must not be the results). The console
scripts run from any directory (in a source checkout ``python -m`` imports the
uninstalled tree, which has no kernels)."""
