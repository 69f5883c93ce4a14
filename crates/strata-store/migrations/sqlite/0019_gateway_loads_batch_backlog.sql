-- Tokens the batches a gateway runs have left: the controller may add
-- spot replicas to work them off sooner where spot is cheap.
ALTER TABLE gateway_loads ADD COLUMN batch_backlog_tokens REAL NOT NULL DEFAULT 0;
