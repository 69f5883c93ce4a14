-- Sessions' KV snapshots (cluster mode), sealed under the tenant's data key,
-- bound to (tenant_id, 'kv_snapshots', session).
CREATE TABLE kv_snapshots (
    tenant_id     TEXT   NOT NULL,
    session       TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    sealed        BYTEA  NOT NULL,
    PRIMARY KEY (tenant_id, session)
);
