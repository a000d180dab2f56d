-- Conversation states as checkpoints plus a token log.
--
-- A state is its parent's state with some tokens fed to it (one read of the engine), so a turn
-- stores a few hundred bytes of tokens instead of whole states. From time to time a state is
-- stored whole (a checkpoint) and the log above it is no longer needed. Named heads (chat,
-- chat_pre, gen_0, gen_1, and the undo copies of a reset) point at states.

CREATE TABLE states (
    id                 INTEGER PRIMARY KEY,
    channel_id         TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    parent_id          INTEGER,         -- the state the tokens were fed to, when base = 'parent'
    base               TEXT NOT NULL CHECK (base IN ('parent', 'zero', 'init', 'checkpoint')),
    preset_key         TEXT NOT NULL,   -- base 'init': the preset whose opening state it starts from
    tokens             BLOB NOT NULL,   -- uint32 little-endian, fed in one read
    replay             INTEGER NOT NULL, -- tokens to feed from the nearest stored state to rebuild it
    meta               TEXT NOT NULL,   -- JSON, e.g. the generation mode that ++ repeats
    model_fingerprint  TEXT NOT NULL,
    checksum           TEXT,            -- sha256 of the row's content; NULL only for migrated checkpoints
    created_at         REAL NOT NULL
);
CREATE INDEX states_by_channel ON states (channel_id);

-- Whole states (the engine's snapshot format, with its own checksum).
CREATE TABLE checkpoints (
    state_id  INTEGER PRIMARY KEY REFERENCES states (id) ON DELETE CASCADE,
    data      BLOB NOT NULL,
    checksum  TEXT NOT NULL
);

CREATE TABLE heads (
    channel_id  TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    name        TEXT NOT NULL
                CHECK (name IN ('chat', 'chat_pre', 'gen_0', 'gen_1', 'undo_chat', 'undo_chat_pre')),
    state_id    INTEGER NOT NULL REFERENCES states (id),
    PRIMARY KEY (channel_id, name)
) WITHOUT ROWID;

-- 1: the conversation is re-read from the transcript at its next message (its stored state was
-- dropped to keep the database within its budget).
ALTER TABLE channels ADD COLUMN rebuild INTEGER NOT NULL DEFAULT 0;
CREATE INDEX channels_by_age ON channels (updated_at);

-- Carry the whole snapshots of earlier versions over as checkpoints.
INSERT INTO states (id, channel_id, parent_id, base, preset_key, tokens, replay, meta,
                    model_fingerprint, checksum, created_at)
    SELECT rowid, channel_id, NULL, 'checkpoint', preset_key, x'', 0, '{}', model_fingerprint, NULL,
           updated_at
    FROM snapshots;
INSERT INTO checkpoints (state_id, data, checksum) SELECT rowid, data, checksum FROM snapshots;
INSERT INTO heads (channel_id, name, state_id) SELECT channel_id, name, rowid FROM snapshots;

INSERT INTO states (id, channel_id, parent_id, base, preset_key, tokens, replay, meta,
                    model_fingerprint, checksum, created_at)
    SELECT rowid + (SELECT coalesce(max(rowid), 0) FROM snapshots), channel_id, NULL, 'checkpoint',
           preset_key, x'', 0, '{}', model_fingerprint, NULL, updated_at
    FROM undo_snapshots;
INSERT INTO checkpoints (state_id, data, checksum)
    SELECT rowid + (SELECT coalesce(max(rowid), 0) FROM snapshots), data, checksum FROM undo_snapshots;
INSERT INTO heads (channel_id, name, state_id)
    SELECT channel_id, 'undo_' || name, rowid + (SELECT coalesce(max(rowid), 0) FROM snapshots)
    FROM undo_snapshots;

DROP TABLE snapshots;
DROP TABLE undo_snapshots;
