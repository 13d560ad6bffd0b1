"""Networks and how they learn: the registry (a leaf), the built-in models, losses, costs, checkpoints, training.

Importing the package registers the built-in models (``models.dsn``: dsn, dual; ``models.baselines``: resnet),
as timm's ``__init__`` does, so that ``from models.registry import create_model`` can build any of them, and the
built-in routing gradients (``models.routing_grads``: none, ste, bpda, eot, sharp, in that order).
"""
from models import routing_grads  # noqa: F401  (registers the built-in routing gradients; first: forwards need them)
from models import baselines, dsn  # noqa: F401  (registers the built-in models)
