"""quantlab's own error types: every expected failure is one of these, shown as one line by the CLI."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator


class QuantlabError(Exception):
    """A problem with the user's input (file, option, model, data): CLI exit code 2."""

    exit_code = 2


class QuantlabRuntimeError(QuantlabError):
    """A failure while doing the work (inference failed, a file could not be written): CLI exit code 1."""

    exit_code = 1


class QuantlabInterrupted(QuantlabRuntimeError):
    """The user pressed Ctrl-C: nothing was written; exit code 130 as for SIGINT."""

    exit_code = 130


@contextlib.contextmanager
def reading(path: str | os.PathLike, problem: str) -> Iterator[None]:
    """Around the decoding of a file given by the user (np.load, zipfile): any failure becomes the one-line
    `QuantlabError` "<path>: <problem> (<what the decoder said>)", and the decoder's warnings are not shown.

    A damaged .npy/.npz makes these decoders raise far more than OSError and ValueError: zipfile raises BadZipFile,
    EOFError, NotImplementedError (a compression method or flag bit it lacks), RuntimeError ("encrypted"), zlib.error;
    NumPy's header parser SyntaxError, tokenize.TokenError, TypeError, MemoryError (a huge shape); and it warns
    (SyntaxWarning, DeprecationWarning) before failing. Keep only decoding calls inside the block.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        except Exception as exc:
            raise QuantlabError(f"{path}: {problem} ({first_line(exc)})") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): foreign errors in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
