"""Where formats come from: every module of this package, installed plugins and directories.

- The package's own ``formats/`` modules are imported (``pkgutil``), so a new file here is
  found with no list to edit.
- An installed distribution declares its format modules in the entry-point group
  ``guardprob.formats`` (``[project.entry-points."guardprob.formats"] mine = "my_pkg.my_format"``).
- ``GUARDPROB_FORMAT_PATH`` names directories (separated by ``os.pathsep``) whose ``*.py``
  files are format modules; the variable is read again on every lookup, so a directory named
  later is still found.

Importing a module runs its ``@register_format`` decorators; that is all discovery does.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
import threading
from importlib.metadata import entry_points
from pathlib import Path

from guardprob.errors import TemplateError

ENV = "GUARDPROB_FORMAT_PATH"
GROUP = "guardprob.formats"

_lock = threading.RLock()
_done: set[str] = set()  # what was imported: "package", "entry points", and each directory


def discover() -> None:
    """Import every format module not imported yet."""
    with _lock:
        if "package" not in _done:
            _done.add("package")
            # this package's own modules, found beside this file (importing the package would be circular)
            for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
                importlib.import_module(f"{__package__}.{info.name}")
        if "entry points" not in _done:
            _done.add("entry points")
            for point in entry_points(group=GROUP):
                _guarded(point.load, f"the format plugin {point.name!r} ({point.value}, entry point group {GROUP})",
                         "fix or uninstall that package")
        for directory in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
            key = str(Path(directory).resolve())
            if key not in _done:
                _done.add(key)
                _load_directory(Path(directory))


def _load_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise TemplateError(f"{ENV} names {str(directory)!r}, which is not a directory; "
                            "name directories that hold format modules (*.py), separated by os.pathsep")
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        name = f"guardprob_format_path.{path.stem}"
        if name in sys.modules:
            raise TemplateError(f"two format modules named {path.stem!r} on {ENV} (the second is {path}); "
                                "rename one of them")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before it runs: dataclasses look their module up

        def run(spec=spec, module=module, name=name):
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise

        _guarded(run, f"the format module {path} (from {ENV})", "fix it, or remove it from that directory")


def _guarded(load, what: str, fix: str) -> None:
    try:
        load()
    except TemplateError:
        raise
    except Exception as exc:
        raise TemplateError(f"{what} failed to load: {type(exc).__name__}: {exc}; {fix}") from exc
