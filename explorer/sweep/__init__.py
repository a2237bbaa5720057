"""Dataset-scale sweeps: every method × setting × image on Ray (``token-explorer sweep``).

:mod:`.spec` (the SPEC, checked before any model loads), :mod:`.datasets` (items listed on the
driver, read by the workers), :mod:`.work` (one worker: the same engine and plugins as the
window), :mod:`.results` (the Parquet results, resumable; summary and plots), :mod:`.run` (Ray
Data with an actor pool per model), :mod:`.presets` (the ``eval-*`` commands as sweeps).
"""
