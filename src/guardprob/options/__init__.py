"""Scoring options declared once (``table``) and the one frozen object a scoring call carries
between layers (``guardprob.options.score.ScoreOptions``)."""

from guardprob.options.table import BY_NAME, GROUPS, OPTIONS, Option, check, check_params, defaults, group

__all__ = ["BY_NAME", "GROUPS", "OPTIONS", "Option", "check", "check_params", "defaults", "group"]
