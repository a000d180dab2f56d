-- A thread of an enabled channel can be switched off on its own: its row says enabled = 0
-- (threads otherwise follow their channel, and a channel without a row is off).

ALTER TABLE enabled_channels ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1;
