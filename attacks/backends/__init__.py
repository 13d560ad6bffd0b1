"""The attack implementations, one module per library (``torchattacks``, ``foolbox``) plus our own (``native``).

Each module registers its attack classes with :func:`attacks.base.register` when imported; :mod:`attacks.base`
imports them lazily, so a library that is missing disables only its own backend.
"""
