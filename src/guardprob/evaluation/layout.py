"""Which columns of a labelled dataset hold what: the conversation, the labels, and an
optional column that says whether the row is unsafe at all."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Columns:
    """Column names of a labelled dataset. A row holds ``messages`` (a conversation), or one user
    message in ``text`` (or ``prompt``), optionally followed by the assistant answer in
    ``response``, which is then the message judged.

    ``labels``: one or more columns whose values are label names or category ids (a list, a
    comma-separated text, a {name: true/false} mapping, or a 0/1 flag naming its own column).
    ``unsafe``: a column that says whether the row is unsafe at all (true/false, 0/1, or words such
    as safe/unsafe, harmful/unharmful); a row it calls safe has no labels whatever the label
    columns say. None means: not given (``over`` takes the base's value), or in a base, no such column.
    """

    text: str | None = None
    messages: str | None = None
    prompt: str | None = None
    response: str | None = None
    labels: str | tuple[str, ...] | None = None
    unsafe: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):  # one column, as the command line's single --labels-column gives it
            object.__setattr__(self, "labels", (self.labels,))
        elif self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))

    def over(self, base: Columns) -> Columns:
        """These columns where given, the base's elsewhere."""
        return replace(base, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None})

    @property
    def conversation(self) -> tuple[str, ...]:
        """The columns a conversation may come from."""
        return tuple(c for c in (self.messages, self.text, self.prompt) if c)


# The generic layout of a JSONL, CSV or table file with no preset.
GENERIC_COLUMNS = Columns(text="text", messages="messages", prompt="prompt", response="response", labels=("labels",))
