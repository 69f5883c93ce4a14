-- strata's schema on PostgreSQL: the same tables as the SQLite migrations
-- 0001-0003 reach, with PostgreSQL types (integers are BIGINT throughout).

-- The usage ledger: one row per served request, no content.
CREATE TABLE usage (
    request_id        TEXT             PRIMARY KEY,
    at_ms             BIGINT           NOT NULL,
    model             TEXT             NOT NULL,
    replica           TEXT             NOT NULL,
    status            BIGINT           NOT NULL,
    prompt_tokens     BIGINT           NOT NULL,
    completion_tokens BIGINT           NOT NULL,
    ttft_ms           DOUBLE PRECISION NOT NULL,
    latency_ms        DOUBLE PRECISION NOT NULL,
    stream            BOOLEAN          NOT NULL,
    tenant_id         TEXT             NOT NULL DEFAULT '',
    key_id            TEXT             NOT NULL DEFAULT '',
    cost_usd          DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE INDEX usage_by_model_time ON usage (model, at_ms);
CREATE INDEX usage_by_tenant_time ON usage (tenant_id, at_ms);

-- Engine instances launched by a provider, and how they ended.
CREATE TABLE instances (
    id            TEXT   PRIMARY KEY,
    provider      TEXT   NOT NULL,
    endpoint      TEXT   NOT NULL,
    state         TEXT   NOT NULL,
    started_at_ms BIGINT NOT NULL,
    ended_at_ms   BIGINT,
    detail        TEXT
);

-- Tenants; their data keys live wrapped in the keyring, not here.
CREATE TABLE tenants (
    id                  TEXT             PRIMARY KEY,
    name                TEXT             NOT NULL UNIQUE,
    isolation           TEXT             NOT NULL,
    requests_per_minute BIGINT,
    tokens_per_minute   BIGINT,
    monthly_budget_usd  DOUBLE PRECISION,
    created_at_ms       BIGINT           NOT NULL
);

-- API keys as SHA-256 digests; `lookup` is the digest's first eight bytes.
CREATE TABLE api_keys (
    tenant_id           TEXT   NOT NULL REFERENCES tenants (id),
    id                  TEXT   NOT NULL,
    name                TEXT   NOT NULL,
    digest              BYTEA  NOT NULL UNIQUE,
    lookup              BIGINT NOT NULL,
    role                TEXT   NOT NULL,
    models              TEXT,
    requests_per_minute BIGINT,
    tokens_per_minute   BIGINT,
    expires_at_ms       BIGINT,
    revoked_at_ms       BIGINT,
    created_at_ms       BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX api_keys_by_lookup ON api_keys (lookup);

-- Append-only: each row carries the hash of the one before.
CREATE TABLE audit (
    seq          BIGINT PRIMARY KEY,
    at_ms        BIGINT NOT NULL,
    actor_key    TEXT   NOT NULL,
    actor_tenant TEXT   NOT NULL,
    action       TEXT   NOT NULL,
    tenant       TEXT   NOT NULL,
    target       TEXT   NOT NULL,
    result       TEXT   NOT NULL,
    prev_hash    TEXT   NOT NULL,
    hash         TEXT   NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant, seq);

-- Sealed tenant content: AES-256-GCM under the tenant's data key, bound to
-- (tenant_id, table, id).
CREATE TABLE stored_completions (
    tenant_id     TEXT   NOT NULL,
    id            TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    model         TEXT   NOT NULL,
    sealed        BYTEA  NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX stored_completions_by_time ON stored_completions (tenant_id, created_at_ms);

CREATE TABLE responses (
    tenant_id       TEXT   NOT NULL,
    id              TEXT   NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    model           TEXT   NOT NULL,
    conversation_id TEXT,
    replica         TEXT,
    sealed          BYTEA  NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX responses_by_conversation ON responses (tenant_id, conversation_id, created_at_ms);

CREATE TABLE conversations (
    tenant_id     TEXT   NOT NULL,
    id            TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    sealed        BYTEA  NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE conversation_items (
    tenant_id       TEXT   NOT NULL,
    conversation_id TEXT   NOT NULL,
    seq             BIGINT NOT NULL,
    id              TEXT   NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    sealed          BYTEA  NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id, seq),
    UNIQUE (tenant_id, id)
);
