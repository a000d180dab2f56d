-- Channels, their conversation snapshots, the shared initial snapshots, and the transcript.

CREATE TABLE channels (
    channel_id  TEXT PRIMARY KEY,
    settings    TEXT NOT NULL DEFAULT '{}',  -- JSON: the channel's own defaults
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);

-- The reference's per-channel snapshots: chat, chat_pre, gen_0, gen_1.
CREATE TABLE snapshots (
    channel_id         TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    name               TEXT NOT NULL CHECK (name IN ('chat', 'chat_pre', 'gen_0', 'gen_1')),
    model_fingerprint  TEXT NOT NULL,
    preset_key         TEXT NOT NULL,
    data               BLOB NOT NULL,
    checksum           TEXT NOT NULL,  -- sha256 of data
    updated_at         REAL NOT NULL,
    PRIMARY KEY (channel_id, name)
);

-- chat_init: the state after a preset's opening prompt, shared by every channel using it.
CREATE TABLE init_snapshots (
    preset_key         TEXT NOT NULL,
    model_fingerprint  TEXT NOT NULL,
    data               BLOB NOT NULL,
    checksum           TEXT NOT NULL,
    created_at         REAL NOT NULL,
    PRIMARY KEY (preset_key, model_fingerprint)
);

CREATE TABLE turns (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    channel_id         TEXT NOT NULL REFERENCES channels (channel_id) ON DELETE CASCADE,
    command            TEXT NOT NULL,
    user_text          TEXT NOT NULL,
    reply_text         TEXT NOT NULL,
    reply_tokens       INTEGER NOT NULL,
    model_fingerprint  TEXT NOT NULL,
    created_at         REAL NOT NULL
);
CREATE INDEX turns_by_channel ON turns (channel_id, id);
