-- Leases: one holder at a time per name (the active controller), until
-- its expiry on the database's clock.
CREATE TABLE leases (
    name          TEXT   PRIMARY KEY,
    holder        TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    transitions   BIGINT NOT NULL DEFAULT 0
);
