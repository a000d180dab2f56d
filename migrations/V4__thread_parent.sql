-- The channel a thread belongs to. Deleting a channel on Discord deletes its threads, archived
-- ones included, and the bot gets no event for a thread it holds no copy of: their
-- conversations are found here and purged with the channel.

ALTER TABLE channels ADD COLUMN parent_id TEXT;  -- NULL unless the conversation is a thread
CREATE INDEX channels_by_parent ON channels (parent_id);
