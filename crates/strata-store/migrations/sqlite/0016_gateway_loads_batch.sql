-- Batch lines holding or waiting for a slot, per gateway and model: the
-- controller keeps such a pool at one replica (not demand).
ALTER TABLE gateway_loads ADD COLUMN batch_lines INTEGER NOT NULL DEFAULT 0;
