"""The texts about conversations, their members and their rooms come from the message
catalogs: French by default (as the bridge has always written them), English when
``bridge.locale`` is ``en``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge.config import MediaConfig
from bridge.core.executors.membership import _departure, _listed, _removal
from bridge.core.portals import not_in_directory, refused_notice, unreachable_notice
from bridge.core.room_policy import exposure, not_relayed
from bridge.core.to_matrix import (
    DELETE_NOT_AUTHOR,
    EDIT_NOT_AUTHOR,
    NOT_BRIDGED,
    NOT_IN_DIRECTORY,
    file_refusal,
)
from bridge.core.vendor_changes import nobody_left, removed_by, renamed, topic_changed
from bridge.i18n import _, current_locale, set_locale
from connectors.base import RemoteAttachment, Sender

PUBLIC = {"m.room.join_rules": {"join_rule": "public"}}
DR_B = Sender(mxid="@b:example.org", display_name="Dr B")


@pytest.fixture
def english() -> Iterator[None]:
    set_locale("en")
    try:
        yield
    finally:
        set_locale("fr")


def test_french_is_the_default_locale() -> None:
    assert current_locale() == "fr"


def test_who_could_not_be_added_in_french() -> None:
    assert unreachable_notice(["810000000001", "@x:ailleurs.fr"]) == (
        "Impossible d'ajouter à cette conversation (inconnu des services connectés, ou "
        "injoignable) : 810000000001, @x:ailleurs.fr."
    )
    assert refused_notice([not_in_directory("810000000001"), "@x:ailleurs.fr (motif)"]) == (
        "Impossible d'ajouter à cette conversation : 810000000001 (absent de l'annuaire "
        "national) ; @x:ailleurs.fr (motif)."
    )


def test_who_could_not_be_added_in_english(english: None) -> None:
    assert unreachable_notice(["810000000001"]) == (
        "Could not add to this conversation (not known to any connected service, or not "
        "reachable): 810000000001."
    )
    assert refused_notice([not_in_directory("810000000001"), "@x:elsewhere.org (why)"]) == (
        "Could not add to this conversation: 810000000001 (not in the national directory); "
        "@x:elsewhere.org (why)."
    )


def test_vendor_changes_in_french() -> None:
    assert removed_by("Dr B") == "Retiré(e) de la conversation par Dr B"
    assert nobody_left("medipeps") == (
        "Plus aucun participant medipeps dans cette conversation : elle n'est plus relayée "
        "vers medipeps."
    )
    assert renamed("Dr B", "RCP") == "Dr B a renommé la conversation : « RCP »"
    assert renamed("Dr B", None) == "Dr B a retiré le titre de la conversation."
    assert topic_changed("Dr B", "Suivi") == "Dr B a changé le sujet de la conversation : « Suivi »"
    assert topic_changed("Dr B", "") == "Dr B a retiré le sujet de la conversation."


def test_vendor_changes_in_english(english: None) -> None:
    assert removed_by("Dr B") == "Removed from the conversation by Dr B"
    assert nobody_left("medipeps") == (
        "No medipeps participant is left in this conversation: it is no longer relayed to medipeps."
    )
    assert renamed("Dr B", "RCP") == "Dr B renamed the conversation: “RCP”"
    assert topic_changed("Dr B", None) == "Dr B removed the conversation's topic."


def test_room_policy_in_both_locales() -> None:
    reason = exposure(PUBLIC)
    assert reason == "la salle est publique : n'importe qui peut la rejoindre"
    assert not_relayed(reason) == (
        "Conversation non relayée : la salle est publique : n'importe qui peut la rejoindre. "
        "Les messages ne sont plus transmis."
    )
    set_locale("en")
    try:
        reason = exposure(PUBLIC)
        assert reason == "the room is public: anyone can join it"
        assert not_relayed(reason) == (
            "Conversation not relayed: the room is public: anyone can join it. Messages are no "
            "longer passed on."
        )
    finally:
        set_locale("fr")


def test_stand_ins_for_membership_in_french() -> None:
    assert _listed(["A", "B", "C"]) == "A, B et C"
    assert _departure(["A"], None, None) == "A a quitté la conversation."
    assert _departure(["A", "B"], DR_B, "doublon") == (
        "A et B ont été retirés de la conversation par Dr B (motif : doublon)."
    )
    assert _removal(["A"], None, None) == (
        "A : vous avez été retiré(e) de cette conversation sur Matrix. Vous ne recevrez plus "
        "les messages de cette conversation."
    )


def test_stand_ins_for_membership_in_english(english: None) -> None:
    assert _listed(["A", "B", "C"]) == "A, B and C"
    assert _departure(["A", "B"], None, None) == "A and B left the conversation."
    assert _departure(["A"], DR_B, "duplicate") == (
        "A was removed from the conversation by Dr B (reason: duplicate)."
    )
    assert _removal(["A"], DR_B, None) == (
        "A: you have been removed from this conversation by Dr B. You will no longer receive "
        "the messages of this conversation."
    )


def test_delivery_statuses_told_to_vendors_in_both_locales() -> None:
    assert _(EDIT_NOT_AUTHOR) == (
        "Modification refusée : seul l'auteur d'un message peut le modifier."
    )
    assert _(NOT_BRIDGED) == (
        "Message non transmis : cette conversation n'est pas relayée hors de ce service."
    )
    assert _(NOT_IN_DIRECTORY).startswith("Message non transmis : l'expéditeur")
    assert _(DELETE_NOT_AUTHOR).startswith("Suppression refusée : ")
    set_locale("en")
    try:
        assert _(EDIT_NOT_AUTHOR) == EDIT_NOT_AUTHOR
        assert _(NOT_BRIDGED) == NOT_BRIDGED
    finally:
        set_locale("fr")


def test_file_refusals_in_both_locales() -> None:
    from connectors.medipeps.connector import MedipepsConnector

    media = MediaConfig()
    exe = RemoteAttachment("setup.exe", "application/x-msdownload", 10, "src")
    connector = MedipepsConnector.__new__(MedipepsConnector)
    assert file_refusal(connector, exe, media) == (
        "les fichiers de type application/x-msdownload ne sont pas autorisés dans cet espace",
        "type_not_allowed",
    )
    set_locale("en")
    try:
        assert file_refusal(connector, exe, media) == (
            "files of type application/x-msdownload are not allowed in this space",
            "type_not_allowed",
        )
    finally:
        set_locale("fr")
