-- Each gateway's last report of its load, for the controller of a cluster
-- (stamped with the database's clock).
CREATE TABLE gateway_loads (
    gateway             TEXT    PRIMARY KEY,
    reported_at_ms      INTEGER NOT NULL,
    requests_total      INTEGER NOT NULL,
    tokens_total        INTEGER NOT NULL,
    prompt_tokens_total INTEGER NOT NULL,
    in_flight           INTEGER NOT NULL,
    waiting             INTEGER NOT NULL,
    routable            INTEGER NOT NULL,
    ttft_p95_ms         REAL,
    tpot_p95_ms         REAL
);
