-- The Discord front end: which channels the bot talks in, per-server settings, undo of resets.

ALTER TABLE channels ADD COLUMN guild_id TEXT;  -- NULL for DMs and the terminal
CREATE INDEX channels_by_guild ON channels (guild_id);

CREATE TABLE enabled_channels (
    channel_id  TEXT PRIMARY KEY,
    guild_id    TEXT NOT NULL,
    enabled_by  TEXT NOT NULL,
    enabled_at  REAL NOT NULL
);

CREATE TABLE guild_settings (
    guild_id    TEXT PRIMARY KEY,
    settings    TEXT NOT NULL DEFAULT '{}',  -- JSON, e.g. {"reset_policy": "moderators"}
    updated_at  REAL NOT NULL
);

-- The conversation as it was before the last reset, for /rwkv undo-reset.
CREATE TABLE undo_snapshots (
    channel_id         TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    name               TEXT NOT NULL CHECK (name IN ('chat', 'chat_pre')),
    model_fingerprint  TEXT NOT NULL,
    preset_key         TEXT NOT NULL,
    data               BLOB NOT NULL,
    checksum           TEXT NOT NULL,
    updated_at         REAL NOT NULL,
    PRIMARY KEY (channel_id, name)
);
