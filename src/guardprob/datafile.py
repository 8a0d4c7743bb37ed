"""Reading the YAML or JSON files users write (taxonomies, server configs)."""

from __future__ import annotations

import json
from pathlib import Path

from guardprob.errors import GuardprobError


def read_data_file(path: Path, what: str, error: type[GuardprobError]) -> object:
    """The parsed content of a .yaml/.yml or .json file; ``what`` names the file in errors
    (e.g. "taxonomy file"), raised as ``error``."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist; give an existing .yaml or .json file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise error(f"{what} {path}: unknown extension {path.suffix!r}; use .yaml, .yml or .json")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            return json.loads(text)
        import yaml  # only where a YAML file is read

        return yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError or yaml.YAMLError
        raise error(f"{what} {path} is not valid {'JSON' if suffix == '.json' else 'YAML'}: {exc}") from None
