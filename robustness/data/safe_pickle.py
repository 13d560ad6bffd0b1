"""Reading CIFAR's python-format pickles without ever running code from them.

``pickle.load`` calls whatever global a file names, so a malicious pickle runs on load. ``read_pickle`` uses an
unpickler that can build plain containers and numpy arrays and nothing else: any other global is refused before
it can be called, and the refusal is a DataError naming the file.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from robustness.core.errors import DataError

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]
    from numpy.core.numeric import _frombuffer as _np_frombuffer  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles of bytes use it (protocol <= 2), limited to latin-1."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    if not isinstance(text, str):
        raise pickle.UnpicklingError("refusing _codecs.encode of a non-string")
    return text.encode("latin-1")


# The globals that numpy arrays in CIFAR pickles need: the originals (Python 2, protocol 2) reference
# numpy.core.multiarray._reconstruct, ndarray and dtype; Python 3 rewrites add _codecs.encode (protocol 2) or
# numeric._frombuffer (protocol 5). Anything else is refused before it can be called.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build plain containers and numpy arrays and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def read_pickle(dataset: str, path: Path) -> dict[str, Any]:
    """The dict stored in the pickle at ``path``, with bytes keys decoded to str."""
    try:
        with path.open("rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{dataset}: cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # truncated or garbage files fail in many ways inside pickle and numpy
        reason = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{dataset}: {path} is not a valid dataset pickle ({type(e).__name__}: {reason})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{dataset}: {path} holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}
