-- Autoscaler decisions that changed a pool, with their inputs (no content).
CREATE TABLE decisions (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms         INTEGER NOT NULL,
    pool          TEXT    NOT NULL,
    from_replicas INTEGER NOT NULL,
    to_replicas   INTEGER NOT NULL,
    reason        TEXT    NOT NULL,
    inputs        TEXT    NOT NULL
);
