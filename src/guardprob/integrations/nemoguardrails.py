"""An action for NeMo Guardrails' input and output rails (docs/integrations/nemoguardrails.md).

In the rails config directory: ``config.yml`` holds ``custom_data: {guardprob: {...}}``
(``api_base`` of a guardprob service, or the in-process settings of ``JudgeSettings``); ``config.py``
holds ``from guardprob.integrations.nemoguardrails import init``, which NeMo calls with the
app; a Colang flow calls the action::

    define flow guardprob check input
      $guardprob_input = execute guardprob_check(role="user")
      if $guardprob_input.flagged
        bot refuse to respond
        stop

``guardprob_check`` returns plain values (``Judgement.as_dict``): ``flagged``,
``flagged_categories`` (ids), ``scores`` (id -> probability), ``p_unsafe`` with its
bounds, and ``categories`` (id -> name, p, lower, upper, score, threshold, flagged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nemoguardrails.actions import action

from guardprob.errors import InputError, UnreadableError
from guardprob.inputs.reader import Reading, Unread, read_request, unreadable_error
from guardprob.integrations.settings import JudgeSettings

if TYPE_CHECKING:
    from nemoguardrails import LLMRails

    from guardprob.classifier import Classifier
    from guardprob.integrations.judges import Judge

ACTION = "guardprob_check"
SECTION = "guardprob"  # the key under config.yml's custom_data
_JUDGE_PARAM = "guardprob_judge"  # the judge reaches the action as a registered action parameter
_UNREADABLE_PARAM = "guardprob_on_unreadable"


def init(app: LLMRails) -> None:
    """What NeMo calls from a config's ``config.py``: the action and its judge."""
    register(app)


def register(app: LLMRails, classifier: Classifier | None = None) -> None:
    """Register ``guardprob_check`` on ``app`` with the judge its config's ``guardprob``
    section describes; ``classifier``: an in-process classifier already loaded."""
    where = f"NeMo Guardrails config {app.config.config_path or '(in code)'}: custom_data.{SECTION}"
    if SECTION not in app.config.custom_data:
        raise InputError(f"{where} is missing; add to config.yml 'custom_data: {{{SECTION}: {{api_base: URL}}}}' for a "
                         "guardprob service (e.g. http://127.0.0.1:8000), or the in-process settings (model, "
                         f"thresholds, ...) in place of api_base; '{SECTION}: {{}}' scores with the offline default model")
    section = app.config.custom_data[SECTION]
    if section is not None and not isinstance(section, dict):
        raise InputError(f"{where} is {type(section).__name__}; write it as a mapping of settings")
    settings = JudgeSettings.from_mapping(section, where)
    app.register_action(guardprob_check, name=ACTION)
    app.register_action_param(_JUDGE_PARAM, settings.judge(classifier))
    app.register_action_param(_UNREADABLE_PARAM, settings.on_unreadable)


@action(name=ACTION)
async def guardprob_check(role: str = "user", context: dict | None = None, guardprob_judge: Judge | None = None,
                          guardprob_on_unreadable: str = "block") -> dict:
    """Judge the user's message (``role="user"``, in an input rail) or the bot's answer to it
    (``role="assistant"``, in an output rail). A message holding something the guard cannot
    read (an image) fails the action, naming it, so the rail fails closed (``on_unreadable:
    block``, the default); with ``judge_text`` its text alone is judged. A message without any
    text to judge fails the action too: there is no judgement to return."""
    if guardprob_judge is None:
        raise InputError(f"{ACTION} ran without its settings; add 'from guardprob.integrations.nemoguardrails "
                         "import init' to the rails config's config.py")
    reading = _conversation(context or {}, role)
    if reading.unread and guardprob_on_unreadable == "block":
        raise UnreadableError(f"{ACTION}(role={role!r}) refuses the message (on_unreadable: block): "
                              f"{unreadable_error(reading.unread)}")
    if not reading.conversations:
        raise InputError(f"{ACTION}(role={role!r}) found no text to judge in the "
                         f"{'user' if role == 'user' else 'bot'} message")
    judgement = await guardprob_judge.judge(reading.conversations[0], role)
    return judgement.as_dict()


def _conversation(context: dict, role: str) -> Reading:
    """The last user message, and for the assistant's role the bot's answer after it, read as
    guardprob reads any message (text, a part or a list of parts: NeMo passes a multimodal
    message's content as it came)."""
    user, bot = context.get("user_message"), context.get("bot_message")
    if role not in ("user", "assistant"):
        raise InputError(f"{ACTION}: role is {role!r}; use role=\"user\" (input rails) or role=\"assistant\" "
                         "(output rails)")
    if role == "user" and user is None:
        raise InputError(f"{ACTION}(role='user') found no user message to judge; call it from an input rail")
    if role == "assistant" and bot is None:
        raise InputError(f"{ACTION}(role='assistant') found no bot message to judge; call it from an output rail")
    messages = [{"role": "user", "content": user}] if user is not None else []
    if role == "assistant":
        messages.append({"role": "assistant", "content": bot})
    reading = read_request({"messages": messages})
    unread = tuple(Unread(_nemo_name(u.where, messages), u.what) for u in reading.unread)
    whole = reading.conversations[0] if reading.conversations else ()
    if not whole or whole[-1].role != role:  # the judged message itself holds no text
        return Reading((), unread)
    return Reading((whole,), unread)


def _nemo_name(where: str, messages: list[dict]) -> str:
    """'messages[0].content[1]' -> 'user_message[1]': the context variable NeMo holds it in."""
    for i, message in enumerate(messages):
        prefix = f"messages[{i}].content"
        if where.startswith(prefix):
            return ("user_message" if message["role"] == "user" else "bot_message") + where[len(prefix):]
    return where
