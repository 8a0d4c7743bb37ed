"""OpenAI's moderation category names on ``/v1/moderations``: each score the exact union
probability of the guard's categories mapped to it (``Scores.groups``).

Shipped mappings (``data/openai-categories.yaml``) cover Llama Guard 3/4 and Qwen3Guard;
``openai_categories`` in the server config names a YAML file of your own (``name: [ids]``),
``auto`` (the default) takes the shipped one where there is one, ``none`` keeps the
taxonomy's own keys.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from guardprob.errors import InputError
from guardprob.inputs.datafile import read_data_file, show
from guardprob.taxonomy import Taxonomy

OPENAI = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
    "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence", "violence/graphic",
)
Mapping = dict[str, tuple[str, ...]]


def shipped() -> dict[str, Mapping]:
    import yaml

    text = resources.files("guardprob").joinpath("data/openai-categories.yaml").read_text(encoding="utf-8")
    return {name: {k: tuple(v) for k, v in rows.items()} for name, rows in yaml.safe_load(text).items()}


def resolve(setting: str, taxonomy: Taxonomy, per_category: bool, where: str) -> Mapping | None:
    """The mapping a server answers with, or None for the taxonomy's own keys."""
    if setting == "none":
        return None
    if setting == "auto":
        found = shipped().get(taxonomy.name)
        if found is None or per_category:
            return None
        return _checked(found, taxonomy, f"the shipped OpenAI mapping for {taxonomy.name}")
    path = Path(setting)
    data = read_data_file(path, "OpenAI category mapping", InputError)
    if not isinstance(data, dict) or not data:
        raise InputError(f"{where}: OpenAI category mapping {path} must map a category name to a list of ids, "
                         f"e.g. 'violence: [S1, S9]'; got {show(data)}")
    if per_category:
        raise InputError(f"{where}: openai_categories needs verdicts that name several categories; this format asks one "
                         "question per category, so set openai_categories: none")
    return _checked({str(k): v for k, v in data.items()}, taxonomy, f"OpenAI category mapping {path}")


def _checked(mapping: dict, taxonomy: Taxonomy, where: str) -> Mapping:
    out: Mapping = {}
    for name, ids in mapping.items():
        if isinstance(ids, str) or not isinstance(ids, list | tuple) or not ids:
            raise InputError(f"{where}: {name!r} maps to {show(ids)}; give a non-empty list of ids, e.g. [S1, S9]")
        unknown = [i for i in ids if i not in taxonomy.ids]
        if unknown:
            raise InputError(f"{where}: {name!r} names {unknown!r}, not ids of taxonomy {taxonomy.name!r} "
                             f"({', '.join(taxonomy.ids)})")
        out[name] = tuple(dict.fromkeys(ids))
    return out
