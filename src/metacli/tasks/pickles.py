"""Reading the pickles and archives that dataset releases ship, without running their code.

A pickle can name any importable function and call it while loading. The releases of
mini-ImageNet, tieredImageNet, CIFAR-100, CIFAR-FS and FC100 hold only numpy arrays,
bytes and plain containers, so ``load_pickle`` admits exactly the globals those need and
refuses every other one before it is called. Python 2 pickles (the CIFAR-100 release,
tieredImageNet's labels) are read as the common loaders read them (latin-1 strings), and
byte-string keys become text, so ``data[b"labels"]`` and ``data["labels"]`` are one key.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

from metacli.errors import MetacliError

SAFE_GLOBALS = {
    # numpy arrays, their dtypes and scalars (numpy 1.x and 2.x module names)
    *(
        (module, name)
        for prefix in ("numpy.core", "numpy._core")
        for module, name in (
            (f"{prefix}.multiarray", "_reconstruct"),
            (f"{prefix}.multiarray", "scalar"),
            (f"{prefix}.numeric", "_frombuffer"),
        )
    ),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # bytes written by protocol 2 from Python 3: _codecs.encode(text, "latin1")
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
}


class SafeUnpickler(pickle.Unpickler):
    """Admits numpy arrays, bytes and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not data")


def text_keys(value: Any) -> Any:
    """A dict's byte-string keys as text (Python 2 pickles read with encoding=bytes)."""
    if isinstance(value, dict):
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in value.items()}
    return value


def loads(data: bytes, name: str, what: str) -> Any:
    """Unpickle ``data`` (the file or archive member ``name``) with the restricted
    unpickler; ``what`` says what the file should hold, for the message."""
    try:
        value = SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise MetacliError(
            f"Refused to load {name}: {err}. A {what} holds only arrays, bytes and plain "
            f"containers; this file holds something else and none of it was run. Use the "
            f"release's own file."
        ) from None
    except Exception as err:  # truncated or corrupted: EOFError, ValueError, ...
        raise MetacliError(
            f"Cannot read {name}: it is damaged or not a pickle ({type(err).__name__}: "
            f"{err}). Replace it with the release's {what}."
        ) from None
    return text_keys(value)


def load_pickle(path: Path, what: str) -> Any:
    """A pickle file read by the restricted unpickler (its dict keys as text)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MetacliError(f"Cannot read {path}: {err.strerror or err}.") from None
    return loads(data, str(path), what)


def load_npz(path: Path, key: str, what: str) -> Any:
    """One array of a numpy ``.npz`` archive, never unpickling an object array."""
    import numpy

    try:
        with numpy.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise MetacliError(
                    f"{path} has no '{key}' array (it has {', '.join(archive.files) or 'none'}). "
                    f"Replace it with the release's {what}."
                )
            return archive[key]
    except MetacliError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise MetacliError(
            f"Cannot read {path}: it is damaged or not a numpy archive ({err}). Replace it "
            f"with the release's {what}."
        ) from None


def require_keys(data: Any, keys: tuple[str, ...], name: str, what: str) -> dict[str, Any]:
    """``data`` as a dict holding ``keys``; otherwise a message naming the file."""
    if not isinstance(data, dict) or not set(keys) <= data.keys():
        found = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise MetacliError(
            f"{name} is not a {what}: it should hold {', '.join(keys)}, and holds {found}. "
            f"Replace it with the release's file."
        )
    return data
