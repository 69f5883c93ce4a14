-- Autoscaler decisions that changed a pool, with their inputs (no content).
CREATE TABLE decisions (
    seq           BIGSERIAL PRIMARY KEY,
    at_ms         BIGINT NOT NULL,
    pool          TEXT   NOT NULL,
    from_replicas BIGINT NOT NULL,
    to_replicas   BIGINT NOT NULL,
    reason        TEXT   NOT NULL,
    inputs        TEXT   NOT NULL
);
