"""An integration's guardprob settings, as written in the framework's own config file,
checked once, and the judge they describe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from guardprob.errors import InputError
from guardprob.inputs.datafile import finite, show
from guardprob.integrations.judges import LocalJudge, ServiceJudge

if TYPE_CHECKING:
    from guardprob.classifier import Classifier

# What to do with a request or answer that holds something the guard cannot read as text
ON_UNREADABLE = ("block", "judge_text")
# Settings of the in-process mode: a service decides with its own.
_LOCAL = ("model", "guardprob_config", "calibration", "thresholds", "default_threshold")


@dataclass(frozen=True)
class JudgeSettings:
    """Either ``api_base`` (a running ``guardprob serve``; ``api_key`` if it asks for one) or
    the in-process settings: ``model`` (a hub id or directory; omitted: the offline default
    model), ``guardprob_config`` (a server config file: thresholds, method, search),
    ``calibration`` (a calibration file from ``guardprob eval``), ``thresholds`` (id, key or
    name -> threshold, over the file's) and ``default_threshold``. ``timeout``: seconds to
    wait for the service. ``on_unreadable``: ``block`` (default) refuses what holds something
    a model reads that the guard cannot (an image, token ids); ``judge_text`` judges the text
    and lets the rest through. ``where`` names the settings in error messages."""

    api_base: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    model: str | None = None
    guardprob_config: str | None = None
    calibration: str | None = None
    thresholds: Mapping[str, float] = field(default_factory=dict)
    default_threshold: float | None = None
    on_unreadable: str = "block"
    where: str = "guardprob settings"

    def __post_init__(self) -> None:
        where = self.where
        for name in ("api_base", "api_key", "model", "guardprob_config", "calibration"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InputError(f"{where}: {name} is {show(value)}; give it as text, or leave it out")
        if self.api_base is not None and not self.api_base.startswith(("http://", "https://")):
            raise InputError(f"{where}: api_base is {self.api_base!r}; give the service's URL, e.g. "
                             "http://127.0.0.1:8000")
        if self.api_key is not None and self.api_base is None:
            raise InputError(f"{where}: api_key is set without api_base; an API key is for a guardprob service, "
                             "so set api_base too (or drop api_key to score in this process)")
        local = [name for name in _LOCAL if getattr(self, name) not in (None, {})]
        if self.api_base is not None and local:
            raise InputError(
                f"{where}: api_base points at a guardprob service, which decides with its own model and thresholds, "
                f"but {', '.join(local)} {'is' if len(local) == 1 else 'are'} set too; set them in the service's "
                "config (guardprob serve --config/--calibration/--model) and leave them out here, or drop api_base "
                "to score in this process"
            )
        if self.on_unreadable not in ON_UNREADABLE:
            raise InputError(f"{where}: on_unreadable is {show(self.on_unreadable)}; use block (refuse what the guard "
                             "cannot read, the default) or judge_text (judge the text, let the rest through)")
        timeout = finite(self.timeout)
        if isinstance(self.timeout, bool) or timeout is None or timeout <= 0:
            raise InputError(f"{where}: timeout is {show(self.timeout)}; use a positive number of seconds")
        if not isinstance(self.thresholds, Mapping):
            raise InputError(f"{where}: thresholds is {show(self.thresholds)}; use a mapping of category "
                             "(id, key or name) to a probability, e.g. {S1: 0.3}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, where: str) -> JudgeSettings:
        """Settings written as a mapping (a YAML section); an unknown key is an error."""
        values = dict(values or {})
        allowed = [f.name for f in fields(cls) if f.name != "where"]
        unknown = sorted(set(values) - set(allowed), key=str)
        if unknown:
            raise InputError(f"{where}: unknown setting(s) {', '.join(map(str, unknown))}; use {', '.join(allowed)}")
        return cls(**values, where=where)

    def judge(self, classifier: Classifier | None = None) -> ServiceJudge | LocalJudge:
        """The judge these settings describe; ``classifier``: an in-process classifier already
        loaded (else ``model`` is loaded here)."""
        if self.api_base is not None:
            if classifier is not None:
                raise InputError(f"{self.where}: both api_base and an in-process classifier are given; use one")
            return ServiceJudge(self.api_base, self.api_key, float(self.timeout))
        if classifier is not None and self.model is not None:
            raise InputError(f"{self.where}: both model and an in-process classifier are given; use one")
        config = self._server_config()
        if classifier is None:
            from guardprob.classifier import Classifier

            classifier = Classifier.from_pretrained(self.model)
        return LocalJudge(classifier, config)

    def _server_config(self):
        from guardprob.server.config import ServerConfig, load_config

        config = load_config(self.guardprob_config) if self.guardprob_config else ServerConfig(source=self.where)
        calibration = None
        if self.calibration:
            from guardprob.evaluation.calibration import load_calibration

            calibration = load_calibration(self.calibration)
        # thresholds here win over the file's, name by name
        return config.with_overrides(
            thresholds={**config.thresholds, **{str(k): v for k, v in self.thresholds.items()}} or None,
            default_threshold=self.default_threshold, calibration=calibration,
        )
