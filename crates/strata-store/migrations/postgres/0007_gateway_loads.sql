-- Each gateway's last report of its load, for the controller of a cluster
-- (stamped with the database's clock).
CREATE TABLE gateway_loads (
    gateway             TEXT             PRIMARY KEY,
    reported_at_ms      BIGINT           NOT NULL,
    requests_total      BIGINT           NOT NULL,
    tokens_total        BIGINT           NOT NULL,
    prompt_tokens_total BIGINT           NOT NULL,
    in_flight           BIGINT           NOT NULL,
    waiting             BIGINT           NOT NULL,
    routable            BIGINT           NOT NULL,
    ttft_p95_ms         DOUBLE PRECISION,
    tpot_p95_ms         DOUBLE PRECISION
);
