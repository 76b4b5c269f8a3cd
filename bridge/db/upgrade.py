"""Numbered schema migrations. Append a new function for every change; never edit a landed one."""

from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme, UpgradeTable

upgrade_table = UpgradeTable(version_table_name="eimis_version", database_name="eimis-bridge")


def _serial(scheme: Scheme) -> str:
    # The only dialect difference in the schema: a monotonic, never-reused sequence number.
    if scheme == Scheme.SQLITE:
        return "INTEGER PRIMARY KEY AUTOINCREMENT"
    return "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"


@upgrade_table.register(description="Initial schema: inbox, outbox, portals, ghosts, message map")
async def upgrade_v1(conn: Connection, scheme: Scheme) -> None:
    await conn.execute(
        """CREATE TABLE as_transaction (
            txn_id      TEXT PRIMARY KEY,
            received_at BIGINT NOT NULL
        )"""
    )
    # Everything that enters the bridge, from the homeserver or a vendor, is written here first.
    # payload is cleared once processed: content is kept only as long as delivery needs it.
    await conn.execute(
        f"""CREATE TABLE inbox (
            seq          {_serial(scheme)},
            origin       TEXT NOT NULL,
            dedup_key    TEXT NOT NULL,
            lane         TEXT NOT NULL,
            payload      TEXT,
            received_at  BIGINT NOT NULL,
            state        TEXT NOT NULL DEFAULT 'pending',
            attempts     INTEGER NOT NULL DEFAULT 0,
            last_error   TEXT,
            UNIQUE (origin, dedup_key)
        )"""
    )
    await conn.execute("CREATE INDEX inbox_pending ON inbox (state, seq)")
    await conn.execute("CREATE INDEX inbox_lane ON inbox (lane, seq)")
    await conn.execute(
        f"""CREATE TABLE outbox (
            seq          {_serial(scheme)},
            connector    TEXT NOT NULL,
            room_id      TEXT NOT NULL,
            operation    TEXT NOT NULL,
            dedup_key    TEXT NOT NULL,
            payload      TEXT,
            created_at   BIGINT NOT NULL,
            state        TEXT NOT NULL DEFAULT 'pending',
            attempts     INTEGER NOT NULL DEFAULT 0,
            last_error   TEXT,
            UNIQUE (connector, dedup_key)
        )"""
    )
    await conn.execute("CREATE INDEX outbox_pending ON outbox (state, seq)")
    await conn.execute("CREATE INDEX outbox_lane ON outbox (connector, room_id, seq)")
    await conn.execute(
        """CREATE TABLE portal (
            room_id     TEXT PRIMARY KEY,
            title       TEXT,
            is_direct   BOOLEAN NOT NULL DEFAULT false,
            voice       TEXT NOT NULL,
            created_at  BIGINT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE portal_link (
            room_id         TEXT NOT NULL REFERENCES portal (room_id) ON DELETE CASCADE,
            connector       TEXT NOT NULL,
            conversation_id TEXT,
            PRIMARY KEY (room_id, connector),
            UNIQUE (connector, conversation_id)
        )"""
    )
    await conn.execute(
        """CREATE TABLE ghost (
            mxid          TEXT PRIMARY KEY,
            connector     TEXT NOT NULL,
            idnps         TEXT NOT NULL,
            display_name  TEXT,
            UNIQUE (connector, idnps)
        )"""
    )
    await conn.execute(
        """CREATE TABLE message_map (
            connector  TEXT NOT NULL,
            remote_id  TEXT NOT NULL,
            room_id    TEXT NOT NULL,
            event_id   TEXT NOT NULL,
            PRIMARY KEY (connector, remote_id)
        )"""
    )
    await conn.execute("CREATE INDEX message_map_event ON message_map (event_id)")
    await conn.execute(
        """CREATE TABLE connector_state (
            connector  TEXT NOT NULL,
            key        TEXT NOT NULL,
            value      TEXT NOT NULL,
            PRIMARY KEY (connector, key)
        )"""
    )


@upgrade_table.register(description="Index the dead letters that hold their conversations")
async def upgrade_v2(conn: Connection, scheme: Scheme) -> None:
    # Every read of pending deliveries asks whether a dead letter holds the row's conversation;
    # without this index that is a scan of the conversation's whole history, row after row.
    await conn.execute(
        "CREATE INDEX outbox_dead ON outbox (connector, room_id, seq) WHERE state = 'dead'"
    )


@upgrade_table.register(description="The directory of professionals and their Matrix IDs")
async def upgrade_v3(conn: Connection, scheme: Scheme) -> None:
    # One row per professional (valid IDNPS only), from the connectors' user lists, the ANS bulk
    # extract (PS_LibreAcces) or FHIR Practitioner/PractitionerRole resources.
    await conn.execute(
        """CREATE TABLE professional (
            idnps            TEXT PRIMARY KEY,
            given_name       TEXT NOT NULL,
            family_name      TEXT NOT NULL,
            profession_code  TEXT,
            profession_label TEXT,
            source           TEXT NOT NULL,
            updated_at       BIGINT NOT NULL
        )"""
    )
    # Where a professional can be reached: a connector's ghost or a native account (several
    # per person is the "several accounts" case; ``preferred`` marks the one chosen).
    await conn.execute(
        """CREATE TABLE professional_mxid (
            idnps     TEXT NOT NULL,
            mxid      TEXT NOT NULL,
            kind      TEXT NOT NULL,
            connector TEXT,
            preferred BOOLEAN NOT NULL DEFAULT false,
            PRIMARY KEY (idnps, mxid)
        )"""
    )
    await conn.execute("CREATE INDEX professional_mxid_mxid ON professional_mxid (mxid)")


@upgrade_table.register(description="The trust list and per-person permissions")
async def upgrade_v4(conn: Connection, scheme: Scheme) -> None:
    # Homeservers of the trust space added at run time (the config's list is the floor).
    await conn.execute(
        """CREATE TABLE trusted_server (
            server_name TEXT PRIMARY KEY,
            added_at    BIGINT NOT NULL,
            added_by    TEXT NOT NULL
        )"""
    )
    # TI-Messenger's permission concept, for vendor users: a default and exceptions.
    await conn.execute(
        """CREATE TABLE permission (
            idnps           TEXT PRIMARY KEY,
            default_setting TEXT NOT NULL,
            updated_at      BIGINT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE permission_exception (
            idnps TEXT NOT NULL,
            kind  TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (idnps, kind, value)
        )"""
    )


@upgrade_table.register(description="Index the directory by change time")
async def upgrade_v5(conn: Connection, scheme: Scheme) -> None:
    # The running bridge asks every few seconds whether the directory changed (its newest
    # updated_at) and then which entries did: without this, a scan of the whole national list.
    await conn.execute("CREATE INDEX professional_updated ON professional (updated_at)")


@upgrade_table.register(description="Index the rows waiting behind a gap in their room")
async def upgrade_v6(conn: Connection, scheme: Scheme) -> None:
    # Every transaction asks whether its rooms have waiting rows: a look-up, never a scan.
    await conn.execute("CREATE INDEX inbox_waiting ON inbox (lane) WHERE state = 'waiting'")


@upgrade_table.register(description="Connectors registered at run time, and their secrets")
async def upgrade_v7(conn: Connection, scheme: Scheme) -> None:
    # Connector instances added (or overridden) at run time: the config's are not stored here
    # unless an operator changed them. Secret values inside ``settings`` are sealed
    # (bridge/secrets.py): the database alone reveals none.
    await conn.execute(
        """CREATE TABLE connector_instance (
            connector_id TEXT PRIMARY KEY,
            type         TEXT NOT NULL,
            enabled      BOOLEAN NOT NULL DEFAULT true,
            settings     TEXT NOT NULL,
            created_at   BIGINT NOT NULL,
            updated_at   BIGINT NOT NULL
        )"""
    )
    # Webhook secrets: the current one (valid_until NULL) and, after a rotation, the previous
    # one, accepted until valid_until (the grace period).
    await conn.execute(
        """CREATE TABLE connector_secret (
            connector_id TEXT NOT NULL,
            sealed       TEXT NOT NULL,
            valid_until  BIGINT,
            created_at   BIGINT NOT NULL
        )"""
    )
    await conn.execute("CREATE INDEX connector_secret_by_id ON connector_secret (connector_id)")


@upgrade_table.register(description="The audit log of deliveries (metadata only)")
async def upgrade_v8(conn: Connection, scheme: Scheme) -> None:
    await conn.execute(
        f"""CREATE TABLE audit_log (
            id          {_serial(scheme)},
            at          BIGINT NOT NULL,
            connector   TEXT NOT NULL,
            direction   TEXT NOT NULL,
            sender      TEXT,
            recipient   TEXT,
            portal      TEXT,
            event_id    TEXT,
            remote_id   TEXT,
            kind        TEXT NOT NULL,
            size        BIGINT,
            outcome     TEXT NOT NULL,
            detail      TEXT
        )"""
    )
    await conn.execute("CREATE INDEX audit_at ON audit_log (at)")
    await conn.execute("CREATE INDEX audit_portal ON audit_log (portal, at)")
    await conn.execute("CREATE INDEX audit_connector ON audit_log (connector, at)")


@upgrade_table.register(description="End-to-bridge encryption: devices, Olm and Megolm sessions")
async def upgrade_v9(conn: Connection, scheme: Scheme) -> None:
    # Every pickle below is encrypted by vodozemac under the crypto pickle key, itself stored
    # here sealed under the operator's secrets key (bridge/secrets.py): the database alone
    # opens no session and reads no message.
    await conn.execute(
        """CREATE TABLE crypto_meta (
            name  TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )"""
    )
    # The bridge's own devices: one per ghost that takes part in an encrypted room, one for the
    # bot. cross_signing: the ghost's master/self-signing/user-signing seeds, encrypted.
    await conn.execute(
        """CREATE TABLE crypto_device (
            user_id        TEXT PRIMARY KEY,
            device_id      TEXT NOT NULL,
            account        TEXT NOT NULL,
            cross_signing  TEXT,
            published      BOOLEAN NOT NULL DEFAULT false,
            sync_since     TEXT,
            created_at     BIGINT NOT NULL
        )"""
    )
    await conn.execute(
        """CREATE TABLE crypto_olm_session (
            user_id     TEXT NOT NULL,
            their_key   TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            pickle      TEXT NOT NULL,
            last_used   BIGINT NOT NULL,
            PRIMARY KEY (user_id, session_id)
        )"""
    )
    await conn.execute(
        "CREATE INDEX crypto_olm_by_peer ON crypto_olm_session (user_id, their_key, last_used)"
    )
    # Megolm sessions the bridge can decrypt with: received from others, and its own (own_key:
    # their key from the first message, sealed; set only on the bridge's own sessions).
    await conn.execute(
        """CREATE TABLE crypto_inbound_group (
            room_id      TEXT NOT NULL,
            session_id   TEXT NOT NULL,
            sender       TEXT NOT NULL,
            sender_key   TEXT NOT NULL,
            signing_key  TEXT,
            pickle       TEXT NOT NULL,
            forwarded    BOOLEAN NOT NULL DEFAULT false,
            own_key      TEXT,
            received_at  BIGINT NOT NULL,
            PRIMARY KEY (room_id, session_id)
        )"""
    )
    # The session each ghost encrypts with in each room, and who was given it: session_key is
    # the key (sealed) as of the message index they got it at, what their new devices are
    # given in turn (a member who joined mid-session never reads what came before).
    await conn.execute(
        """CREATE TABLE crypto_outbound_group (
            room_id     TEXT NOT NULL,
            user_id     TEXT NOT NULL,
            session_id  TEXT NOT NULL,
            pickle      TEXT NOT NULL,
            created_at  BIGINT NOT NULL,
            messages    INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (room_id, user_id)
        )"""
    )
    await conn.execute(
        """CREATE TABLE crypto_shared (
            session_id   TEXT NOT NULL,
            user_id      TEXT NOT NULL,
            device_id    TEXT NOT NULL,
            session_key  TEXT NOT NULL,
            shared_at    BIGINT NOT NULL,
            PRIMARY KEY (session_id, user_id, device_id)
        )"""
    )
    # Other users' devices, from /keys/query; outdated when the homeserver says they changed.
    await conn.execute(
        """CREATE TABLE crypto_peer_device (
            user_id     TEXT NOT NULL,
            device_id   TEXT NOT NULL,
            curve25519  TEXT NOT NULL,
            ed25519     TEXT NOT NULL,
            PRIMARY KEY (user_id, device_id)
        )"""
    )
    await conn.execute("CREATE INDEX crypto_peer_by_key ON crypto_peer_device (curve25519)")
    await conn.execute("CREATE INDEX crypto_shared_by_user ON crypto_shared (user_id)")
    await conn.execute(
        """CREATE TABLE crypto_tracked_user (
            user_id   TEXT PRIMARY KEY,
            outdated  BOOLEAN NOT NULL
        )"""
    )
    # Which event each Megolm message index decrypted as: the same ciphertext under another
    # event id (replayed by a homeserver) is refused. Metadata only, no content; purged with the
    # audit log's retention.
    await conn.execute(
        """CREATE TABLE crypto_message_index (
            session_id     TEXT NOT NULL,
            message_index  BIGINT NOT NULL,
            event_id       TEXT NOT NULL,
            seen_at        BIGINT NOT NULL,
            PRIMARY KEY (session_id, message_index)
        )"""
    )
    await conn.execute("CREATE INDEX crypto_message_index_seen ON crypto_message_index (seen_at)")
    # Rooms with m.room.encryption: once on, never off (the specification's rule).
    await conn.execute(
        """CREATE TABLE crypto_room (
            room_id        TEXT PRIMARY KEY,
            algorithm      TEXT NOT NULL,
            rotation_ms    BIGINT NOT NULL,
            rotation_msgs  INTEGER NOT NULL
        )"""
    )


@upgrade_table.register(description="Erasures waiting for their Matrix part; joins to portals")
async def upgrade_v10(conn: Connection, scheme: Scheme) -> None:
    # Erasures (``forget``): when each was asked, and the bridge's users whose Matrix part
    # (redactions, leaving rooms, clearing the profile) still waits for the homeserver. Once
    # done, ``pending`` is emptied: the row keeps times only, never who was erased.
    await conn.execute(
        f"""CREATE TABLE erasure (
            id            {_serial(scheme)},
            requested_at  BIGINT NOT NULL,
            pending       TEXT NOT NULL,
            attempts      INTEGER NOT NULL DEFAULT 0,
            last_error    TEXT,
            done_at       BIGINT
        )"""
    )
    # Who joined which portal, when (a later step tells the vendor side). Ids and time only.
    await conn.execute(
        f"""CREATE TABLE portal_join (
            id         {_serial(scheme)},
            room_id    TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            event_id   TEXT NOT NULL,
            at         BIGINT NOT NULL,
            UNIQUE (event_id)
        )"""
    )
    await conn.execute("CREATE INDEX portal_join_room ON portal_join (room_id, at)")


@upgrade_table.register(description="Who each vendor side of a portal has; links that closed")
async def upgrade_v11(conn: Connection, scheme: Scheme) -> None:
    del scheme
    # Per portal and connector: the people (Matrix ids) that vendor conversation was told are
    # in it, so a membership change reaches each side once and never goes back where it came
    # from. Ids only.
    await conn.execute(
        """CREATE TABLE portal_participant (
            room_id    TEXT NOT NULL REFERENCES portal (room_id) ON DELETE CASCADE,
            connector  TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            PRIMARY KEY (room_id, connector, user_id)
        )"""
    )
    # A link whose vendor side has nobody left: what was queued is still delivered, nothing new
    # is routed there, and a vendor event of that conversation is no longer bridged.
    await conn.execute("ALTER TABLE portal_link ADD COLUMN closed_at BIGINT")


@upgrade_table.register(description="Search keys for the directory: names without case or accents")
async def upgrade_v12(conn: Connection, scheme: Scheme) -> None:
    # ``find`` (the bot's help desk) and the third-party lookup search names by word prefix,
    # whatever the case and accents: each name is kept folded (``search_key``) beside itself,
    # indexed so that ``LIKE 'dup%'`` is a range scan (PostgreSQL: text_pattern_ops; SQLite
    # uses the index for a prefix LIKE when case_sensitive_like is off only on NOCASE columns,
    # so the folded columns are declared COLLATE NOCASE there: they are lower case anyway).
    from bridge.db.directory import search_key  # noqa: PLC0415 (the one folding rule)

    collate = " COLLATE NOCASE" if scheme == Scheme.SQLITE else ""
    await conn.execute(f"ALTER TABLE professional ADD COLUMN family_key TEXT{collate}")
    await conn.execute(f"ALTER TABLE professional ADD COLUMN given_key TEXT{collate}")
    rows = await conn.fetch("SELECT idnps, given_name, family_name FROM professional")
    if rows:
        await conn.executemany(
            "UPDATE professional SET family_key = $2, given_key = $3 WHERE idnps = $1",
            [(r["idnps"], search_key(r["family_name"]), search_key(r["given_name"])) for r in rows],
        )
    ops = "" if scheme == Scheme.SQLITE else " text_pattern_ops"
    await conn.execute(f"CREATE INDEX professional_family_key ON professional (family_key{ops})")
    await conn.execute(f"CREATE INDEX professional_given_key ON professional (given_key{ops})")


@upgrade_table.register(description="Index the portals' participants by person")
async def upgrade_v13(conn: Connection, scheme: Scheme) -> None:
    del scheme
    # A person's direct chats (the help desk's ``dm``) and their erasure look people up by
    # Matrix id across every portal.
    await conn.execute("CREATE INDEX portal_participant_user ON portal_participant (user_id)")


@upgrade_table.register(description="Ghost rows seen by a connector's user listing")
async def upgrade_v14(conn: Connection, scheme: Scheme) -> None:
    del scheme
    # The directory is published in the homeserver's user directory from the connectors' user
    # lists: each listing pass stamps the ghost rows it saw, and a complete pass forgets the
    # connector's rows it did not see (the person left that vendor). NULL: never listed.
    await conn.execute("ALTER TABLE professional_mxid ADD COLUMN listed_at BIGINT")
    await conn.execute(
        "CREATE INDEX professional_mxid_connector ON professional_mxid (connector, listed_at)"
    )
    # A ghost that no longer reaches its person (forgotten by a listing) is named "<name>
    # (former account)" from then on: directory renames leave it alone until it is chosen again.
    await conn.execute("ALTER TABLE ghost ADD COLUMN former_at BIGINT")


@upgrade_table.register(description="Professionals' secure mailboxes (directory)")
async def upgrade_v15(conn: Connection, scheme: Scheme) -> None:
    del scheme
    # The secure-mail addresses (personal mailboxes) the national sources list for a professional:
    # a mail connector resolves a sender's address to an IDNPS through them. Stored as given
    # (domain in lower case); compared without case through the index on lower(address)
    # (addresses are ASCII: SQLite's and PostgreSQL's lower() agree on them).
    await conn.execute(
        """CREATE TABLE professional_mailbox (
            idnps    TEXT NOT NULL,
            address  TEXT NOT NULL,
            kind     TEXT NOT NULL,
            source   TEXT NOT NULL,
            PRIMARY KEY (idnps, address)
        )"""
    )
    await conn.execute(
        "CREATE INDEX professional_mailbox_address ON professional_mailbox (lower(address))"
    )
