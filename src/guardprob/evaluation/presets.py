"""Presets for public safety datasets: where each lives on the hub, which of its columns hold
the conversation and the labels, and how its labels map onto the taxonomies guardprob ships.

docs/evaluation.md shows every table and says where a mapping is not one to one. A label
mapped to ``NO_CATEGORY`` (None) has no counterpart in the taxonomy: a row whose only unsafe
labels are such is left out and counted ("unmapped").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from guardprob.errors import InputError
from guardprob.evaluation.labels import NO_CATEGORY, SAFE, LabelMap
from guardprob.evaluation.layout import Columns
from guardprob.taxonomy import PRESETS as TAXONOMIES


@dataclass(frozen=True)
class Layout:
    """The columns a preset reads for one taxonomy, and its labels' map onto that taxonomy."""

    columns: Columns
    labels: LabelMap


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    hub_id: str
    subset: str | None
    split: str
    licence: str
    layouts: Mapping[str, Layout]  # taxonomy name -> layout; the first is the default

    def layout(self, taxonomy: str | None) -> tuple[str, Layout]:
        """(taxonomy, layout) for the given taxonomy, or the preset's default one."""
        name = taxonomy or next(iter(self.layouts))
        if name not in self.layouts:
            raise InputError(
                f"preset {self.name} maps {self.title}'s labels onto {', '.join(self.layouts)}, not {name}; pass "
                f"--taxonomy with one of them (the instruction format takes any), or read the data without the "
                "preset, naming its columns and mapping its labels yourself (--labels-column, --map)"
            )
        return name, self.layouts[name]


def _ids(table: Mapping[str, str | tuple[str, ...] | None]) -> dict[str, tuple[str, ...] | None]:
    return {k: (v,) if isinstance(v, str) else v for k, v in table.items()}


# Llama Guard 3 ids -> Llama Guard 2's (S5 Defamation, S13 Elections, S14 Code Interpreter Abuse are new in 3).
_LG3_TO_LG2 = {"S1": "S1", "S2": "S2", "S3": "S3", "S4": "S4", "S6": "S5", "S7": "S6", "S8": "S7", "S9": "S8",
               "S10": "S9", "S11": "S10", "S12": "S11"}


def _llama_guard_layouts(columns: Columns, lg3: Mapping[str, str | tuple[str, ...] | None]) -> dict[str, Layout]:
    """One map written for Llama Guard 3 ids serves Llama Guard 4 and PolyGuard (the same ids and
    categories) and, translated, Llama Guard 2 (where a category is absent the label has none)."""
    lg3_map = LabelMap(_ids(lg3))
    lg2: dict[str, tuple[str, ...] | None] = {}
    for name, ids in lg3_map.entries.items():
        if ids is None or ids == SAFE:
            lg2[name] = ids
        else:
            kept = tuple(_LG3_TO_LG2[i] for i in ids if i in _LG3_TO_LG2)
            lg2[name] = kept or NO_CATEGORY
    shared = Layout(columns, lg3_map)
    return {"llama-guard-3": shared, "llama-guard-4": shared, "polyguard": shared,
            "llama-guard-2": Layout(columns, LabelMap(lg2))}


# -- BeaverTails: 14 harm flags on a (prompt, response) pair; the response is judged ----------------
_BEAVERTAILS_COLUMNS = Columns(prompt="prompt", response="response", labels=("category",))
_BEAVERTAILS_LG3 = {
    "animal_abuse": "S1",
    "child_abuse": "S1",  # Llama Guard's S1 covers child abuse; the flag does not say it is sexual (S4)
    "controversial_topics,politics": NO_CATEGORY,
    "discrimination,stereotype,injustice": "S10",
    "drug_abuse,weapons,banned_substance": "S2",
    "financial_crime,property_crime,theft": "S2",
    "hate_speech,offensive_language": "S10",
    "misinformation_regarding_ethics,laws_and_safety": NO_CATEGORY,
    "non_violent_unethical_behavior": NO_CATEGORY,
    "privacy_violation": "S7",
    "self_harm": "S11",
    "sexually_explicit,adult_content": "S12",
    "terrorism,organized_crime": "S1",
    "violence,aiding_and_abetting,incitement": "S1",
}

# -- Aegis 2.0: prompt_label safe/unsafe, violated_categories "A, B"; the prompt is judged ---------
_AEGIS_COLUMNS = Columns(text="prompt", labels=("violated_categories",), unsafe="prompt_label")
_AEGIS_LG3 = {
    "Violence": "S1",
    "Sexual": "S12",
    "Criminal Planning/Confessions": "S2",
    "Guns and Illegal Weapons": "S2",
    "Controlled/Regulated Substances": "S2",
    "Suicide and Self Harm": "S11",
    "Sexual (minor)": "S4",
    "Hate/Identity Hate": "S10",
    "PII/Privacy": "S7",
    "Harassment": "S10",  # as the server's OpenAI mapping reads harassment
    "Threat": "S1",
    "Profanity": NO_CATEGORY,
    "Needs Caution": NO_CATEGORY,
    "Other": NO_CATEGORY,
    "Manipulation": NO_CATEGORY,
    "Fraud/Deception": "S2",
    "Malware": "S2",  # Llama Guard 3 lists malware among its non-violent (cyber) crimes
    "High Risk Gov Decision Making": NO_CATEGORY,
    "Political/Misinformation/Conspiracy": NO_CATEGORY,
    "Copyright/Trademark/Plagiarism": "S8",
    "Unauthorized Advice": "S6",
    "Illegal Activity": "S2",
    "Immoral/Unethical": NO_CATEGORY,
}
# NemoGuard's taxonomy is Aegis 2.0's own: each name is its category, one to one.
_AEGIS_NEMOGUARD = {c.name: (c.id,) for c in TAXONOMIES["nemoguard"]}

# -- WildGuardMix: harmful/unharmful per side, and the prompt's subcategory -------------------------
_WILDGUARD_PROMPT_COLUMNS = Columns(text="prompt", labels=("subcategory",), unsafe="prompt_harm_label")
_WILDGUARD_LG3 = {
    "benign": SAFE,
    "violence_and_physical_harm": "S1",
    "fraud_assisting_illegal_activities": "S2",
    "cyberattack": "S2",
    "sexual_content": "S12",
    "private_information_individual": "S7",
    "copyright_violations": "S8",
    "toxic_language_hate_speech": "S10",
    "social_stereotypes_and_unfair_discrimination": "S10",
    "mental_health_over-reliance_crisis": "S11",
    "causing_material_harm_by_disseminating_misinformation": "S6",  # dangerous claims, as in Specialized Advice
    "sensitive_information_organization_government": NO_CATEGORY,  # Privacy is about people
    "defamation_encouraging_unethical_or_unsafe_actions": NO_CATEGORY,  # mostly unethical actions, not defamation
    "disseminating_false_or_misleading_information_encouraging_disinformation_campaigns": NO_CATEGORY,
    "others": NO_CATEGORY,
}
# WildGuard answers the same questions the set labels: each side's harm, read from its own column.
# The refusal label is left out: evaluation reads every label as unsafe, and a refusal is not.
_WILDGUARD_NATIVE = Layout(
    Columns(text="prompt", response="response", labels=("prompt_harm_label", "response_harm_label")),
    LabelMap({"prompt_harm_label:harmful": ("harmful_request",), "prompt_harm_label:unharmful": SAFE,
              "response_harm_label:harmful": ("harmful_response",), "response_harm_label:unharmful": SAFE}),
)

# -- ToxicChat: 0/1 toxicity and jailbreaking of a user prompt --------------------------------------
_TOXICCHAT = {
    "granite-guardian": Layout(Columns(text="user_input", labels=("toxicity", "jailbreaking")),
                               LabelMap({"toxicity": ("harm",), "jailbreaking": ("jailbreak",)})),
    "wildguard": Layout(Columns(text="user_input", labels=("toxicity",)),
                        LabelMap({"toxicity": ("harmful_request",)})),
}

# -- OpenAI's moderation evaluation set: one 0/1 column per category ---------------------------------
_OPENAI_COLUMNS = Columns(text="prompt", labels=("S", "H", "V", "HR", "SH", "S3", "H2", "V2"))
# As the server's OpenAI mapping (data/openai-categories.yaml), read the other way.
_OPENAI_LG3 = {"S": "S12", "H": "S10", "V": "S1", "HR": "S10", "SH": "S11", "S3": "S4", "H2": "S10", "V2": "S1"}
_OPENAI_QWEN3GUARD = {"S": "sexual_content", "H": "unethical_acts", "V": "violent", "HR": "unethical_acts",
                      "SH": "suicide_self_harm", "S3": "sexual_content", "H2": "unethical_acts", "V2": "violent"}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("beavertails", "BeaverTails", "PKU-Alignment/BeaverTails", None, "30k_test", "CC BY-NC 4.0",
           _llama_guard_layouts(_BEAVERTAILS_COLUMNS, _BEAVERTAILS_LG3)),
    Preset("aegis2", "Aegis 2.0", "nvidia/Aegis-AI-Content-Safety-Dataset-2.0", None, "test", "CC BY 4.0",
           {"nemoguard": Layout(_AEGIS_COLUMNS, LabelMap(_AEGIS_NEMOGUARD)),
            **_llama_guard_layouts(_AEGIS_COLUMNS, _AEGIS_LG3)}),
    Preset("wildguardmix", "WildGuardMix", "allenai/wildguardmix", "wildguardtest", "test", "ODC-BY (gated)",
           {"wildguard": _WILDGUARD_NATIVE, **_llama_guard_layouts(_WILDGUARD_PROMPT_COLUMNS, _WILDGUARD_LG3)}),
    Preset("toxicchat", "ToxicChat", "lmsys/toxic-chat", "toxicchat0124", "test", "CC BY-NC 4.0", _TOXICCHAT),
    Preset("openai-moderation", "OpenAI's moderation evaluation set", "mmathys/openai-moderation-api-evaluation",
           None, "train", "MIT",
           {**_llama_guard_layouts(_OPENAI_COLUMNS, _OPENAI_LG3),
            "qwen3guard": Layout(_OPENAI_COLUMNS, LabelMap(_ids(_OPENAI_QWEN3GUARD)))}),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown dataset preset {name!r}; use one of {', '.join(PRESETS)}")
    return PRESETS[name]
