"""Matrix events that are not ``m.room.message`` made into messages vendors can take.

No vendor of ours has polls or stickers, and nothing a portal member sends may vanish: a poll
(MSC3381, stable ``m.poll.*`` and unstable ``org.matrix.msc3381.poll.*``) becomes readable text
with numbered answers, its responses and its end follow as text; a sticker becomes an image;
an event of another type that carries a text (``body`` or an MSC1767 ``m.text``) becomes that
text. What cannot be made a message is refused, and its sender told why (``unsupported``).

Each function returns the ``m.room.message`` content to route, which carries under
``eimis.converted`` what was done (the executor words it for the sender's send status).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from bridge.i18n import N_, _

POLL_START = frozenset({"m.poll.start", "org.matrix.msc3381.poll.start"})
POLL_RESPONSE = frozenset({"m.poll.response", "org.matrix.msc3381.poll.response"})
POLL_END = frozenset({"m.poll.end", "org.matrix.msc3381.poll.end"})
POLL_TYPES = POLL_START | POLL_RESPONSE | POLL_END
STICKER = "m.sticker"
CONVERTIBLE_TYPES = POLL_TYPES | {STICKER}
"""Event types this module makes messages of (besides unknown types that carry a text)."""

NOT_CONTENT = frozenset(
    {
        "m.room.encrypted",  # decrypted by the router, or someone else's echo
        "com.beeper.message_send_status",
        "m.call.candidates",
        "m.call.answer",
        "m.call.hangup",
        "m.call.select_answer",
        "m.call.negotiate",
        "m.call.reject",
        "m.key.verification.ready",
        "m.key.verification.start",
        "m.key.verification.accept",
        "m.key.verification.key",
        "m.key.verification.mac",
        "m.key.verification.done",
        "m.key.verification.cancel",
    }
)
"""Room events that are protocol between clients, not something a person said: never bridged,
never refused (a refusal for each would be noise)."""

CONVERTED_NOTES = {
    "poll": N_("poll sent as text: {vendor} has no polls"),
    "poll_response": N_("poll answer sent as text"),
    "poll_end": N_("poll closing sent as text"),
    "sticker": N_("sticker sent as an image"),
    "event_type": N_("event of type {type} sent as text"),
}
"""What each conversion did, for the sender's send status (``{vendor}``, ``{type}``): catalog
texts, translated where they are used (``note``)."""

_TEXT_KEYS = ("m.text", "org.matrix.msc1767.text")
_MAX_ANSWERS = 50
_MAX_TEXT = 2000


def unsupported(event_type: str) -> str:
    """The reason (in the bridge's locale) given to the sender of an event no vendor can
    take."""
    return _("this type of content ({type}) cannot be passed on to the other participants").format(
        type=event_type[:64]
    )


@dataclass(frozen=True)
class Poll:
    question: str
    answers: tuple[tuple[str, str], ...]
    """(answer id, answer text), in the poll's order."""

    def answer(self, answer_id: str) -> str | None:
        return next((text for aid, text in self.answers if aid == answer_id), None)


def text_of(value: Any) -> str | None:
    """An MSC1767 text: a plain string, or a list of representations (``{"body", "mimetype"}``,
    the plain one preferred)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        bodies = [r for r in value if isinstance(r, dict) and isinstance(r.get("body"), str)]
        plain = [r for r in bodies if r.get("mimetype") in (None, "text/plain")]
        chosen = (plain or bodies)[:1]
        return str(chosen[0]["body"]) if chosen else None
    return None


def fallback_text(content: dict[str, Any]) -> str | None:
    """The text an event offers clients that do not know its type: ``body`` or ``m.text``."""
    body = content.get("body")
    if isinstance(body, str) and body.strip():
        return body
    for key in _TEXT_KEYS:
        text = text_of(content.get(key))
        if text is not None and text.strip():
            return text
    return None


def poll_of(content: dict[str, Any]) -> Poll | None:
    """The question and answers of a poll start's content (stable or unstable), or None."""
    stable = _obj(content.get("m.poll"))
    unstable = _obj(content.get("org.matrix.msc3381.poll.start"))
    poll = stable or unstable
    if not poll:
        return None
    question_block = _obj(poll.get("question"))
    question = _first_text(question_block) or text_of(poll.get("question"))
    answers: list[tuple[str, str]] = []
    raw_answers = poll.get("answers")
    for answer in raw_answers[:_MAX_ANSWERS] if isinstance(raw_answers, list) else []:
        if not isinstance(answer, dict):
            continue
        answer_id = answer.get("m.id", answer.get("id"))
        text = _first_text(answer)
        if isinstance(answer_id, str) and text is not None:
            answers.append((answer_id, _clip(text)))
    if question is None or not answers:
        return None
    return Poll(_clip(question), tuple(answers))


def poll_text(poll: Poll) -> str:
    lines = [_("Poll: {question}").format(question=poll.question)]
    lines += [f"{n}. {text}" for n, (_unused, text) in enumerate(poll.answers, start=1)]
    return "\n".join(lines)


def poll_start_message(content: dict[str, Any]) -> dict[str, Any] | None:
    """A poll start as text with numbered answers; its fallback text when it cannot be read."""
    poll = poll_of(content)
    if poll is not None:
        return _text(poll_text(poll), "poll")
    fallback = fallback_text(content)
    if not fallback:
        return None
    return _text(_("Poll: {question}").format(question=_clip(fallback)), "poll")


def selections(content: dict[str, Any]) -> list[str]:
    """The answer ids a poll response chose (stable ``m.selections`` or unstable)."""
    chosen = content.get("m.selections")
    if not isinstance(chosen, list):
        chosen = _obj(content.get("org.matrix.msc3381.poll.response")).get("answers")
    if not isinstance(chosen, list):
        return []
    return [a for a in chosen if isinstance(a, str)][:_MAX_ANSWERS]


def poll_response_message(
    content: dict[str, Any], sender_name: str, poll: Poll | None
) -> dict[str, Any]:
    """A vote as a sentence: the answer's text when the poll is known, else a generic one."""
    chosen = selections(content)
    texts = [t for a in chosen if poll is not None and (t := poll.answer(a)) is not None]
    if texts and len(texts) == len(chosen):
        answers = ", ".join(texts)
        if poll is not None:
            text = _("{name} answered: {answers} (poll: {question})").format(
                name=sender_name, answers=answers, question=poll.question
            )
        else:
            text = _("{name} answered: {answers}").format(name=sender_name, answers=answers)
    elif not chosen:
        text = _("{name} withdrew their answer to the poll").format(name=sender_name)
    else:
        text = _("{name} answered the poll").format(name=sender_name)
    return _text(text, "poll_response")


def poll_end_message(content: dict[str, Any], poll: Poll | None) -> dict[str, Any]:
    """The end of a poll: "Poll closed" (in the bridge's locale), with the results its event
    gives in text."""
    head = (
        _("Poll closed: {question}").format(question=poll.question)
        if poll is not None
        else _("Poll closed")
    )
    results = fallback_text(content)
    return _text(f"{head}\n{_clip(results)}" if results else head, "poll_end")


def sticker_message(content: dict[str, Any]) -> dict[str, Any] | None:
    """A sticker as the image it is (``url``, or ``file`` in an encrypted room)."""
    url = content.get("url")
    encrypted = content.get("file") if isinstance(content.get("file"), dict) else None
    if not isinstance(url, str) and encrypted is None:
        return None
    body = content.get("body")
    image: dict[str, Any] = {
        "msgtype": "m.image",
        "body": body if isinstance(body, str) and body else "sticker",
        "info": _obj(content.get("info")),
        "eimis.converted": "sticker",
    }
    if isinstance(url, str):
        image["url"] = url
    if encrypted is not None:
        image["file"] = encrypted
    return image


def other_event_message(event_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
    """An event of a type no vendor knows: its text when it carries one, else None."""
    text = fallback_text(content)
    if text is None:
        return None
    message = _text(text, "event_type")
    message["eimis.event_type"] = event_type[:64]
    return message


def note(content: dict[str, Any], vendor: str) -> str | None:
    """The sentence for the sender's send status about a converted message, if it was."""
    kind = content.get("eimis.converted")
    template = CONVERTED_NOTES.get(kind) if isinstance(kind, str) else None
    if template is None:
        return None
    return _(template).format(vendor=vendor, type=str(content.get("eimis.event_type", "")))


class PollMemory:
    """The polls this bridge routed lately, by (room, event), so a vote can name its answer
    without asking the homeserver (bounded: the oldest are forgotten first)."""

    def __init__(self, size: int = 2048) -> None:
        self._polls: OrderedDict[tuple[str, str], Poll] = OrderedDict()
        self._size = size

    def remember(self, room_id: str, event_id: str, poll: Poll) -> None:
        self._polls[(room_id, event_id)] = poll
        self._polls.move_to_end((room_id, event_id))
        while len(self._polls) > self._size:
            self._polls.popitem(last=False)

    def get(self, room_id: str, event_id: str) -> Poll | None:
        return self._polls.get((room_id, event_id))


def _text(body: str, converted: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body, "eimis.converted": converted}


def _first_text(block: dict[str, Any]) -> str | None:
    for key in _TEXT_KEYS:
        text = text_of(block.get(key))
        if text is not None and text.strip():
            return text.strip()
    return None


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
