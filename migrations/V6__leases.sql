-- Leases: which replica holds a channel, and the epoch it took it under. A write given an epoch
-- is stored only while that is still the channel's epoch (fencing a replica that lost the
-- channel). Not deleted with a channel's conversation: its epochs go on from here.

CREATE TABLE leases (
    channel_id  TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    epoch       INTEGER NOT NULL,
    taken_at    REAL NOT NULL
);
