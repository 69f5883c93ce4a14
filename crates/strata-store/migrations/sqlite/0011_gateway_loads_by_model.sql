-- A gateway reports its whole load (model '') and each catalog model's
-- share, so a cluster's controller scales each model's pool by its own.
CREATE TABLE gateway_loads_by_model (
    gateway             TEXT    NOT NULL,
    model               TEXT    NOT NULL DEFAULT '',
    reported_at_ms      INTEGER NOT NULL,
    requests_total      INTEGER NOT NULL,
    tokens_total        INTEGER NOT NULL,
    prompt_tokens_total INTEGER NOT NULL,
    in_flight           INTEGER NOT NULL,
    waiting             INTEGER NOT NULL,
    routable            INTEGER NOT NULL,
    ttft_p95_ms         REAL,
    tpot_p95_ms         REAL,
    PRIMARY KEY (gateway, model)
);
INSERT INTO gateway_loads_by_model (gateway, model, reported_at_ms, requests_total, tokens_total,
    prompt_tokens_total, in_flight, waiting, routable, ttft_p95_ms, tpot_p95_ms)
SELECT gateway, '', reported_at_ms, requests_total, tokens_total, prompt_tokens_total, in_flight,
    waiting, routable, ttft_p95_ms, tpot_p95_ms FROM gateway_loads;
DROP TABLE gateway_loads;
ALTER TABLE gateway_loads_by_model RENAME TO gateway_loads;
