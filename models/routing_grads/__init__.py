"""The built-in routing gradients, one module each (see :mod:`models.routing`).

Imported by :mod:`models` in this order, which is the order of ``GRAD_MODES``: ``none, ste, bpda, eot, sharp``.
"""
from models.routing_grads import none, ste, bpda, eot, sharp  # noqa: F401  (registers them, in this order)
