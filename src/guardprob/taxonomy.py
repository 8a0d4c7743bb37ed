"""Categories of harm: the presets of the guard families, custom files, and the taxonomies
formats write in their own files."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from guardprob.errors import TaxonomyError
from guardprob.inputs.datafile import read_data_file, show, unicode_problem

# Characters the verdict grammar uses as syntax, so no id may contain them.
_RESERVED = {",", "\n"}


@dataclass(frozen=True)
class Category:
    id: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class Taxonomy:
    """An ordered set of categories with unique ids."""

    name: str
    categories: tuple[Category, ...]

    def __post_init__(self) -> None:
        if not self.categories:
            raise TaxonomyError(f"taxonomy {self.name!r} has no categories; add at least one")
        seen: set[str] = set()
        for position, category in enumerate(self.categories):
            _check_id(category.id, f"taxonomy {self.name!r}, category {position}")
            if category.id in seen:
                raise TaxonomyError(
                    f"taxonomy {self.name!r} has the id {category.id!r} twice; give every category its own id"
                )
            seen.add(category.id)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __len__(self) -> int:
        return len(self.categories)

    def __getitem__(self, category_id: str) -> Category:
        for category in self.categories:
            if category.id == category_id:
                return category
        raise TaxonomyError(f"taxonomy {self.name!r} has no category {category_id!r}; its ids are {', '.join(self.ids)}")


def _check_id(category_id: object, where: str) -> None:
    if not isinstance(category_id, str) or not category_id.strip():
        raise TaxonomyError(f"{where}: field 'id' is empty or not a string; give each category a short id such as 'S1'")
    bad = next((ch for ch in category_id if _breaks_verdict(ch)), None)
    if bad is not None:
        raise TaxonomyError(
            f"{where}: id {show(category_id)} contains whitespace, a control character or a comma ({_describe(bad)}); "
            "ids are written into the verdict as comma-separated words, so use letters, digits, '-' or '_'"
        )


def _breaks_verdict(ch: str) -> bool:
    """A comma, or any Unicode whitespace, control, format, private or unassigned character
    (categories Z* and C*): the verdict could not be split into ids, or not be read back."""
    return ch in _RESERVED or ch.isspace() or unicodedata.category(ch)[0] in "CZ"


def _describe(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return f"U+{ord(ch):04X}{' ' + name if name else ''}"


def _text_field(value: object, field: str, where: str, required: bool) -> str:
    """A category's (or the file's) name or description: text, stripped; a name is required."""
    if not isinstance(value, str) or (required and not value.strip()):
        need = "give it a readable name" if required else "write it as text"
        raise TaxonomyError(f"{where}: field {field!r} is {show(value)}, not {'non-empty ' if required else ''}text; {need}")
    problem = unicode_problem(value)
    if problem:
        raise TaxonomyError(f"{where}: field {field!r} is {problem}; fix the file's text")
    return value.strip()


def _preset(name: str, rows: list[tuple[str, str]]) -> Taxonomy:
    return Taxonomy(name, tuple(Category(f"S{i}", n, d) for i, (n, d) in enumerate(rows, start=1)))


_LG3_ROWS = [
    ("Violent Crimes", "Content that enables, encourages or excuses violence against people or animals."),
    ("Non-Violent Crimes", "Content that enables fraud, theft, hacking, drug or weapons crimes and other non-violent crimes."),
    ("Sex-Related Crimes", "Content that enables sex trafficking, sexual assault, harassment or prostitution."),
    ("Child Sexual Exploitation", "Content that contains, describes or enables the sexual abuse of children."),
    ("Defamation", "Verifiably false statements that injure a living person's reputation."),
    ("Specialized Advice", "Specialised financial, medical or legal advice, or claims that dangerous things are safe."),
    ("Privacy", "Sensitive, non-public personal information that could undermine someone's security."),
    ("Intellectual Property", "Content that violates the intellectual property rights of a third party."),
    ("Indiscriminate Weapons", "Content that enables chemical, biological, radiological, nuclear or high-yield explosive weapons."),
    ("Hate", "Content that demeans people on the basis of sensitive, protected characteristics."),
    ("Suicide & Self-Harm", "Content that enables, encourages or endorses suicide, self-injury or disordered eating."),
    ("Sexual Content", "Depictions of nude adults or content with erotic descriptions or explicit sex acts."),
    ("Elections", "Factually incorrect information about electoral systems and processes."),
    ("Code Interpreter Abuse", "Content that tries to abuse code interpreters, such as denial of service or container escapes."),
]

_LG2_ROWS = [
    ("Violent Crimes", _LG3_ROWS[0][1]),
    ("Non-Violent Crimes", _LG3_ROWS[1][1]),
    ("Sex Crimes", _LG3_ROWS[2][1]),
    ("Child Exploitation", _LG3_ROWS[3][1]),
    ("Specialized Advice", _LG3_ROWS[5][1]),
    ("Privacy", _LG3_ROWS[6][1]),
    ("Intellectual Property", _LG3_ROWS[7][1]),
    ("Indiscriminate Weapons", _LG3_ROWS[8][1]),
    ("Hate", _LG3_ROWS[9][1]),
    ("Self-Harm", _LG3_ROWS[10][1]),
    ("Sexual Content", _LG3_ROWS[11][1]),
]

# PolyGuard's system prompt names the categories as Llama Guard 2 does, with Defamation and
# Elections and Code Interpreter Abuse of Llama Guard 3.
_POLYGUARD_ROWS = [
    (name, _LG3_ROWS[i][1]) for i, name in enumerate((
        "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation", "Specialized Advice",
        "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content", "Elections",
        "Code Interpreter Abuse"))
]


def _named(name: str, rows: list[tuple[str, str, str]]) -> Taxonomy:
    return Taxonomy(name, tuple(Category(i, n, d) for i, n, d in rows))


# Each guard family's own categories; a name is how the family's prompt and verdicts write it.
_QWEN3GUARD_ROWS = [
    ("violent", "Violent", "Instructions, methods or strategies for violence, weapons or harm to people or animals."),
    ("non_violent_illegal_acts", "Non-violent Illegal Acts", "Guidance or support for non-violent crimes such as hacking, fraud or drug production."),
    ("sexual_content", "Sexual Content or Sexual Acts", "Sexual imagery, references or descriptions, including illegal sexual content."),
    ("pii", "PII", "Disclosure of personally identifiable information without authorisation."),
    ("suicide_self_harm", "Suicide & Self-Harm", "Content advocating, encouraging or instructing suicide or self-harm."),
    ("unethical_acts", "Unethical Acts", "Bias, discrimination, hate, harassment, misinformation and other unethical conduct."),
    ("politically_sensitive", "Politically Sensitive Topics", "Deliberate falsehoods or distortions about government actions, historical events or public figures."),
    ("copyright_violation", "Copyright Violation", "Reproduction or distribution of copyrighted material without permission."),
    ("jailbreak", "Jailbreak", "Attempts to override the model's system prompt or safety rules (judged in prompts only)."),
]
_WILDGUARD_ROWS = [
    ("harmful_request", "Harmful request", "The human user's request is harmful."),
    ("response_refusal", "Response refusal", "The AI assistant's response is a refusal."),
    ("harmful_response", "Harmful response", "The AI assistant's response is harmful."),
]

# ShieldGemma's policies: a description is the rule after "content that" (the model card's table).
_SHIELDGEMMA_ROWS = [
    ("dangerous_content", "Dangerous Content", "harming oneself and/or others (e.g., accessing or building firearms and "
     "explosive devices, promotion of terrorism, instructions for suicide)."),
    ("harassment", "Harassment", "is malicious, intimidating, bullying, or abusive content targeting another individual "
     "(e.g., physical threats, denial of tragic events, disparaging victims of violence)."),
    ("hate_speech", "Hate Speech", "targeting identity and/or protected attributes (e.g., racial slurs, promotion of "
     "discrimination, calls to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of "
     "race, ethnicity, religion, disability, age, nationality, veteran status, sexual orientation, gender, gender "
     "identity, caste, or any other protected status. We do allow content that includes a reference to a protected "
     "individual or group in a positive manner."),
    ("sexually_explicit", "Sexually Explicit Information", "contains references to sexual acts or other lewd content "
     "(e.g., sexually graphic descriptions, content aimed at causing arousal). Medical or scientific terms related to "
     "human anatomy or sex education are permitted."),
]
# Granite Guardian's harm risks (the format asks each with the model's own risk definition).
_GRANITE_ROWS = [
    ("harm", "Harm", "Content considered universally harmful."),
    ("social_bias", "Social Bias", "Systemic prejudice against groups based on shared identity or characteristics."),
    ("jailbreak", "Jailbreak", "Deliberate circumvention of an AI system's safeguards or ethical guidelines."),
    ("violence", "Violence", "Content promoting or describing physical harm to individuals or groups."),
    ("profanity", "Profanity", "Language considered offensive or socially unacceptable in a given context."),
    ("sexual_content", "Sexual Content", "Material explicitly related to sexual activities, anatomy, or desires."),
    ("unethical_behavior", "Unethical Behavior", "Actions that violate moral or professional standards."),
]

# NemoGuard's (Aegis 2.0) categories: ids as its prompt lists them, names as its verdicts write them.
_NEMOGUARD_NAMES = [
    "Violence", "Sexual", "Criminal Planning/Confessions", "Guns and Illegal Weapons", "Controlled/Regulated Substances",
    "Suicide and Self Harm", "Sexual (minor)", "Hate/Identity Hate", "PII/Privacy", "Harassment", "Threat", "Profanity",
    "Needs Caution", "Other", "Manipulation", "Fraud/Deception", "Malware", "High Risk Gov Decision Making",
    "Political/Misinformation/Conspiracy", "Copyright/Trademark/Plagiarism", "Unauthorized Advice", "Illegal Activity",
    "Immoral/Unethical",
]

PRESETS: dict[str, Taxonomy] = {
    "llama-guard-2": _preset("llama-guard-2", _LG2_ROWS),
    "llama-guard-3": _preset("llama-guard-3", _LG3_ROWS),
    "llama-guard-4": _preset("llama-guard-4", _LG3_ROWS),
    "qwen3guard": _named("qwen3guard", _QWEN3GUARD_ROWS),
    "wildguard": _named("wildguard", _WILDGUARD_ROWS),
    "shieldgemma": _named("shieldgemma", _SHIELDGEMMA_ROWS),
    "granite-guardian": _named("granite-guardian", _GRANITE_ROWS),
    "polyguard": _preset("polyguard", _POLYGUARD_ROWS),
    "nemoguard": Taxonomy("nemoguard", tuple(Category(f"S{i}", n) for i, n in enumerate(_NEMOGUARD_NAMES, start=1))),
}


def load_taxonomy(spec: str | Path | Taxonomy, named: Mapping[str, Taxonomy] | None = None) -> Taxonomy:
    """A preset name, a name in ``named``, a YAML/JSON file path, or a Taxonomy (returned
    unchanged). ``named``: more taxonomies by name; ``guardprob.load_taxonomy`` passes those
    the registered formats write in their own files (``guardprob.formats.taxonomies``)."""
    if isinstance(spec, Taxonomy):
        return spec
    named = named or {}
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    if isinstance(spec, str) and spec in named:
        return named[spec]
    path = Path(spec)
    if not path.suffix:
        raise TaxonomyError(
            f"unknown taxonomy preset {str(spec)!r}; use one of {', '.join([*PRESETS, *named])} or a .yaml/.json file"
        )
    return _load_file(path)


def _load_file(path: Path) -> Taxonomy:
    return taxonomy_from_data(read_data_file(path, "taxonomy file", TaxonomyError), path)


def taxonomy_from_data(data: object, path: Path, where: str | None = None) -> Taxonomy:
    """A taxonomy from a file's parsed content (a list of categories, or a mapping with
    ``name`` and ``categories``); ``where`` names it in errors."""
    where = where or f"taxonomy file {path}"
    name = path.stem
    if isinstance(data, dict):
        if "name" in data:
            name = _text_field(data["name"], "name", where, required=True)
        data = data.get("categories")
    if not isinstance(data, list) or not data:
        raise TaxonomyError(
            f"{where}: expected a non-empty list of categories (or a mapping with a 'categories' "
            "list), each with 'id', 'name' and 'description'"
        )
    categories = []
    for position, row in enumerate(data):
        at = f"{where}, category {position}"
        if not isinstance(row, dict):
            raise TaxonomyError(f"{at}: expected a mapping with 'id', 'name' and 'description', got {show(row)}")
        _check_id(row.get("id"), at)
        category_name = _text_field(row.get("name"), "name", at, required=True)
        description = _text_field(row.get("description", ""), "description", at, required=False)
        categories.append(Category(row["id"], category_name, description))
    try:
        return Taxonomy(name, tuple(categories))
    except TaxonomyError as exc:
        raise TaxonomyError(f"{where}: {exc}") from None
