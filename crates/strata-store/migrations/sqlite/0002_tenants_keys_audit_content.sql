-- Tenants and their settings. Data keys are not here: they live, wrapped, in
-- the keyring file, so a database backup holds no keys.
CREATE TABLE tenants (
    id                  TEXT    PRIMARY KEY,
    name                TEXT    NOT NULL UNIQUE,
    isolation           TEXT    NOT NULL,
    requests_per_minute INTEGER,
    tokens_per_minute   INTEGER,
    monthly_budget_usd  REAL,
    created_at_ms       INTEGER NOT NULL
);

-- API keys, stored only as SHA-256 digests; `lookup` is the digest's first
-- eight bytes, for finding candidates to compare in constant time.
CREATE TABLE api_keys (
    tenant_id           TEXT    NOT NULL REFERENCES tenants (id),
    id                  TEXT    NOT NULL,
    name                TEXT    NOT NULL,
    digest              BLOB    NOT NULL UNIQUE,
    lookup              INTEGER NOT NULL,
    role                TEXT    NOT NULL,
    models              TEXT,
    requests_per_minute INTEGER,
    tokens_per_minute   INTEGER,
    expires_at_ms       INTEGER,
    revoked_at_ms       INTEGER,
    created_at_ms       INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX api_keys_by_lookup ON api_keys (lookup);

ALTER TABLE usage ADD COLUMN tenant_id TEXT NOT NULL DEFAULT '';
ALTER TABLE usage ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
ALTER TABLE usage ADD COLUMN cost_usd REAL NOT NULL DEFAULT 0;
CREATE INDEX usage_by_tenant_time ON usage (tenant_id, at_ms);

-- Append-only: each row carries the hash of the one before.
CREATE TABLE audit (
    seq          INTEGER PRIMARY KEY,
    at_ms        INTEGER NOT NULL,
    actor_key    TEXT    NOT NULL,
    actor_tenant TEXT    NOT NULL,
    action       TEXT    NOT NULL,
    tenant       TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    result       TEXT    NOT NULL,
    prev_hash    TEXT    NOT NULL,
    hash         TEXT    NOT NULL
);
CREATE INDEX audit_by_tenant ON audit (tenant, seq);

-- Chat completions kept with `store: true`; `sealed` is AES-256-GCM under the
-- tenant's data key, bound to (tenant_id, 'stored_completions', id).
CREATE TABLE stored_completions (
    tenant_id     TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    model         TEXT    NOT NULL,
    sealed        BLOB    NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX stored_completions_by_time ON stored_completions (tenant_id, created_at_ms);
