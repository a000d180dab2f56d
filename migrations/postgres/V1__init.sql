-- The Postgres store: the tables of the SQLite backend's migrations 1-6 as they stand, with
-- whole states (checkpoints and opening states) kept in the object store and named here by key.
-- An object is written before the row that names it; objects no row names are collected later.

CREATE TABLE channels (
    channel_id  TEXT PRIMARY KEY,
    settings    TEXT NOT NULL DEFAULT '{}',  -- JSON: the channel's own defaults
    guild_id    TEXT,                        -- NULL for DMs and the terminal
    parent_id   TEXT,                        -- NULL unless the conversation is a thread
    rebuild     BOOLEAN NOT NULL DEFAULT false,  -- re-read from the transcript at its next message
    created_at  DOUBLE PRECISION NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX channels_by_guild ON channels (guild_id);
CREATE INDEX channels_by_parent ON channels (parent_id);
CREATE INDEX channels_by_age ON channels (updated_at);

CREATE TABLE enabled_channels (
    channel_id  TEXT PRIMARY KEY,
    guild_id    TEXT NOT NULL,
    enabled_by  TEXT NOT NULL,
    enabled_at  DOUBLE PRECISION NOT NULL,
    enabled     BOOLEAN NOT NULL DEFAULT true  -- false: a thread switched off on its own
);

CREATE TABLE guild_settings (
    guild_id    TEXT PRIMARY KEY,
    settings    TEXT NOT NULL DEFAULT '{}',
    updated_at  DOUBLE PRECISION NOT NULL
);

-- The state log: a state is its parent's state with tokens fed to it in one read.
CREATE TABLE states (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id         TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    parent_id          BIGINT,
    base               TEXT NOT NULL CHECK (base IN ('parent', 'zero', 'init', 'checkpoint')),
    preset_key         TEXT NOT NULL,
    tokens             BYTEA NOT NULL,   -- uint32 little-endian
    replay             INTEGER NOT NULL,
    meta               TEXT NOT NULL,    -- JSON
    model_fingerprint  TEXT NOT NULL,
    checksum           TEXT,
    created_at         DOUBLE PRECISION NOT NULL
);
CREATE INDEX states_by_channel ON states (channel_id);

-- Whole states: the object holding the engine's snapshot bytes, their size and checksum.
CREATE TABLE checkpoints (
    state_id    BIGINT PRIMARY KEY REFERENCES states (id) ON DELETE CASCADE,
    object_key  TEXT NOT NULL UNIQUE,
    size        BIGINT NOT NULL,
    checksum    TEXT NOT NULL
);

CREATE TABLE heads (
    channel_id  TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    name        TEXT NOT NULL
                CHECK (name IN ('chat', 'chat_pre', 'gen_0', 'gen_1', 'undo_chat', 'undo_chat_pre')),
    state_id    BIGINT NOT NULL REFERENCES states (id),
    PRIMARY KEY (channel_id, name)
);

-- The opening state of each preset, shared by every channel, per model.
CREATE TABLE init_snapshots (
    preset_key         TEXT NOT NULL,
    model_fingerprint  TEXT NOT NULL,
    object_key         TEXT NOT NULL UNIQUE,
    size               BIGINT NOT NULL,
    checksum           TEXT NOT NULL,
    created_at         DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (preset_key, model_fingerprint)
);

CREATE TABLE turns (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id         TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    command            TEXT NOT NULL,
    user_text          TEXT NOT NULL,
    reply_text         TEXT NOT NULL,
    reply_tokens       INTEGER NOT NULL,
    model_fingerprint  TEXT NOT NULL,
    created_at         DOUBLE PRECISION NOT NULL
);
CREATE INDEX turns_by_channel ON turns (channel_id, id);
CREATE INDEX turns_by_age ON turns (created_at);

-- Which replica holds a channel, and the epoch it took it under (kept when the channel is purged).
CREATE TABLE leases (
    channel_id  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    epoch       BIGINT NOT NULL,
    taken_at    DOUBLE PRECISION NOT NULL
);
