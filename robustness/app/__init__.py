"""The roof: the command line (:mod:`~robustness.app.cli`, one module per command in :mod:`~robustness.app.commands`),
``dsn-robust run`` (:mod:`~robustness.app.pipeline`, :mod:`~robustness.app.eps_grid`) and the Python API
(:mod:`~robustness.app.api`, re-exported lazily by :mod:`robustness`). Nothing below this package imports it.
"""
