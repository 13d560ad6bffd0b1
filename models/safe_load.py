"""Reading a torch file without running code: the one place checkpoints and ``--weights`` files are opened.

``torch.load(weights_only=True)`` refuses pickles that would construct arbitrary objects (a malicious checkpoint
cannot run code), but it reports a refusal as ``pickle.UnpicklingError`` and a damaged file as any of several
exception types; :func:`load_torch_file` turns each into one :class:`CheckpointError` line saying which it was.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from robustness.core.errors import CheckpointError, first_line


def load_torch_file(path: str | Path, what: str = "checkpoint") -> Any:
    """The content of ``path`` loaded on the CPU with ``weights_only=True``; CheckpointError (one line naming
    ``what``) for a missing, unsafe, corrupt or truncated file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load this {what}: it holds more than plain weights "
                              f"({first_line(err, 'unsupported content')[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated {what} ({first_line(err)[:160]})") from None
