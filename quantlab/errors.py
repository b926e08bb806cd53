"""quantlab's own error types: every expected failure is one of these, shown as one line by the CLI."""

from __future__ import annotations

import zipfile
import zlib

# What reading a damaged .npy / .npz file can raise, besides I/O errors: NumPy's header parser (ValueError), and
# zipfile for a broken archive (BadZipFile, EOFError), a damaged deflate stream (zlib.error), or header bits that turn
# on a compression method, encryption or flag it does not support (NotImplementedError, RuntimeError). Readers turn
# these into a one-line QuantlabError naming the file.
CORRUPT_FILE_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


class QuantlabError(Exception):
    """A problem with the user's input (file, option, model, data): CLI exit code 2."""

    exit_code = 2


class QuantlabRuntimeError(QuantlabError):
    """A failure while doing the work (inference failed, a file could not be written): CLI exit code 1."""

    exit_code = 1


class QuantlabInterrupted(QuantlabRuntimeError):
    """The user pressed Ctrl-C: nothing was written; exit code 130 as for SIGINT."""

    exit_code = 130
