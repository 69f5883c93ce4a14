-- Tokens a second the batches a gateway runs need to end within their
-- windows: the controller adds replicas for it where interactive work
-- leaves too little.
ALTER TABLE gateway_loads ADD COLUMN batch_tokens_per_s REAL NOT NULL DEFAULT 0;
