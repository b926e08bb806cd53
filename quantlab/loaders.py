"""Data-loader scripts: `--data loader.py[:function]`, Polygraphy's `--data-loader-script` convention.

The script is a Python file with a function (`load_data` unless named) that takes no arguments and returns or yields
the calibration feeds: dicts of input name -> array, or bare arrays for a single-input model. It holds what only the
user knows (where the images are, how the model wants them preprocessed), so quantlab runs it instead of asking for
files. Every failure in the script, at import or while it yields, becomes one line that names the script and the line
in it where the failure happened (the last frame of the traceback within the script).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from quantlab.errors import QuantlabError, first_line

DEFAULT_FUNCTION = "load_data"  # Polygraphy's default, so that its loader scripts work as they are


@dataclass(frozen=True)
class LoaderScript:
    """A loader script and the function in it that yields the feeds."""

    path: Path
    function: str = DEFAULT_FUNCTION

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> LoaderScript | None:
        """The loader script a data argument names (`loader.py` or `loader.py:function`); None for anything else (a
        data directory)."""
        text = os.fspath(spec)
        path, colon, function = text.rpartition(":")
        if colon and path.endswith(".py"):
            if not function.isidentifier():
                raise QuantlabError(f"{text}: expected loader.py:FUNCTION, a Python function name after the colon")
            return cls(Path(path), function)
        if text.endswith(".py") and not Path(text).is_dir():
            return cls(Path(text))
        return None

    def __str__(self) -> str:
        return f"{self.path}:{self.function}"

    def run(self) -> Iterator[Any]:
        """Call the function and yield what it yields; an exception raised in the script becomes a one-line
        QuantlabError naming the script's line. Closing this iterator closes the loader's generator."""
        try:
            produced = self.loader()
        except Exception as exc:
            raise self._failure(exc, f"data loader {self.function}()") from exc
        if not isinstance(produced, Iterable):
            raise QuantlabError(
                f"{self}: returned {type(produced).__name__}, not an iterable of feeds (dicts of input name -> array)"
            )
        values = iter(produced)
        try:
            while True:
                try:
                    value = next(values)
                except StopIteration:
                    return
                except Exception as exc:
                    raise self._failure(exc, f"data loader {self.function}()") from exc
                yield value
        finally:
            close = getattr(values, "close", None)
            if close is not None:
                close()

    @functools.cached_property
    def _filename(self) -> str:
        """The script's file name as its code objects carry it (what tracebacks show)."""
        return str(self.path.resolve())

    @functools.cached_property
    def loader(self) -> Callable[[], Any]:
        """The function, from the script imported (once per LoaderScript: a new one reads the script again)."""
        loader = getattr(self._module, self.function, None)
        if loader is None:
            module = self._module.__name__
            defined = [
                name
                for name, value in vars(self._module).items()
                if callable(value) and getattr(value, "__module__", None) == module and not name.startswith("_")
            ]
            found = f"it defines {', '.join(defined)}" if defined else "it defines no function"
            raise QuantlabError(f"{self.path}: no function {self.function!r} in the data loader script ({found})")
        if not callable(loader):
            raise QuantlabError(f"{self.path}: {self.function!r} is a {type(loader).__name__}, not a function")
        return loader

    @functools.cached_property
    def _module(self) -> ModuleType:
        """The script, imported once per LoaderScript with its own folder on sys.path (for its sibling modules), and
        registered in sys.modules (dataclasses and pickling look their module up there)."""
        if not self.path.is_file():
            raise QuantlabError(f"{self.path}: data loader script not found")
        importlib.invalidate_caches()  # the script's folder may have changed since an earlier import
        name = "quantlab_data_loader_" + hashlib.sha256(self._filename.encode()).hexdigest()[:16]
        spec = importlib.util.spec_from_file_location(name, self._filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(self.path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise self._failure(exc, "importing the data loader script") from exc
        finally:
            sys.path.remove(str(self.path.resolve().parent))
        return module

    def _failure(self, exc: Exception, doing: str) -> QuantlabError:
        """`exc` as one line: the script and its line where it happened, what quantlab was doing, the exception."""
        if isinstance(exc, SyntaxError) and exc.filename == self._filename:
            return QuantlabError(f"{self.path}:{exc.lineno}: {doing} failed: SyntaxError: {exc.msg}")
        lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == self._filename]
        where = f"{self.path}:{lines[-1]}" if lines else str(self.path)
        return QuantlabError(f"{where}: {doing} raised {type(exc).__name__}: {first_line(exc)}")
