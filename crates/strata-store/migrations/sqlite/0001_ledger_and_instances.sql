-- The usage ledger: one row per served request, no content.
CREATE TABLE usage (
    request_id        TEXT    PRIMARY KEY,
    at_ms             INTEGER NOT NULL,
    model             TEXT    NOT NULL,
    replica           TEXT    NOT NULL,
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    ttft_ms           REAL    NOT NULL,
    latency_ms        REAL    NOT NULL,
    stream            INTEGER NOT NULL
);
CREATE INDEX usage_by_model_time ON usage (model, at_ms);

-- Engine instances launched by a provider, and how they ended.
CREATE TABLE instances (
    id            TEXT    PRIMARY KEY,
    provider      TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,
    state         TEXT    NOT NULL,
    started_at_ms INTEGER NOT NULL,
    ended_at_ms   INTEGER,
    detail        TEXT
);
