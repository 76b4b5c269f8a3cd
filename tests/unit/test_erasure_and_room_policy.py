"""Which queued content is a person's (structured match, never a substring of the stored text)
and which rooms are open to anyone, without a homeserver (end to end: test_e2e_erasure.py,
test_e2e_admin.py, test_e2e_room_policy.py)."""

from __future__ import annotations

from bridge.core.erasure import authored_by, inbox_authored_by
from bridge.core.room_policy import exposure, stripped_state
from bridge.db.inbox import CRYPTO_ORIGIN, MATRIX_ORIGIN

IDNPS = "810000001916"
GHOST = f"@eimis_pandalab_{IDNPS}:eimis.localhost"
OTHER = "@camille:eimis.localhost"


def sent_by(mxid: str, idnps: str | None, body: str) -> dict[str, object]:
    return {
        "event_id": "$e",
        "sender": {"mxid": mxid, "display_name": "X", "connector": None, "idnps": idnps},
        "content": {"msgtype": "m.text", "body": body},
    }


def test_queued_deliveries_are_theirs_by_sender_not_by_what_the_text_says() -> None:
    mxids = {GHOST}
    assert authored_by(sent_by(GHOST, IDNPS, "Dose: 2 g"), IDNPS, mxids)
    assert authored_by(sent_by("@eimis_medipeps_x:s", IDNPS, "ok"), IDNPS, mxids)  # her IDNPS
    # Someone else's message that names her (her IDNPS or her Matrix ID) stays.
    assert not authored_by(sent_by(OTHER, None, f"Voir {IDNPS} / {GHOST}"), IDNPS, mxids)
    # A conversation to open (members listed, no sender) is not something she said.
    assert not authored_by({"members": [IDNPS], "external": []}, IDNPS, mxids)
    assert not authored_by({"sender": "not an object"}, IDNPS, mxids)


def test_inbox_items_are_theirs_by_their_sender_field() -> None:
    mxids = {GHOST}
    assert inbox_authored_by("pandalab", {"sender": IDNPS, "text": "x"}, IDNPS, mxids)
    assert not inbox_authored_by("pandalab", {"sender": "8100", "text": IDNPS}, IDNPS, mxids)
    assert inbox_authored_by(MATRIX_ORIGIN, {"sender": GHOST}, IDNPS, mxids)
    assert not inbox_authored_by(MATRIX_ORIGIN, {"sender": OTHER, "body": GHOST}, IDNPS, mxids)
    assert not inbox_authored_by(CRYPTO_ORIGIN, {"sender": GHOST}, IDNPS, mxids)


def state(join_rule: str, history: str = "shared", guests: str = "forbidden") -> dict:
    return {
        "m.room.join_rules": {"join_rule": join_rule},
        "m.room.history_visibility": {"history_visibility": history},
        "m.room.guest_access": {"guest_access": guests},
    }


def test_rooms_open_to_anyone_are_exposed_and_private_ones_are_not() -> None:
    assert "publique" in str(exposure(state("public")))
    assert "invités" in str(exposure(state("public", guests="can_join")))
    assert "lisible par tout le monde" in str(exposure(state("invite", "world_readable")))
    # Guests can join an invite-only room only when invited: not open to anyone.
    assert exposure(state("invite", guests="can_join")) is None
    assert exposure(state("knock", "joined")) is None
    assert exposure({}) is None


def test_an_invites_stripped_state_is_read_by_type() -> None:
    raw = {
        "unsigned": {
            "invite_room_state": [
                {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "public"}},
                {"type": "m.room.member", "state_key": "@x:s", "content": {"membership": "join"}},
                "garbage",
            ]
        }
    }
    assert stripped_state(raw) == {"m.room.join_rules": {"join_rule": "public"}}
    assert exposure(stripped_state(raw)) is not None
    assert stripped_state({}) == {} and stripped_state({"unsigned": []}) == {}
