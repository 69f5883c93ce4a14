-- Sessions' KV snapshots when kept in the database (cluster mode), sealed
-- under the tenant's data key, bound to (tenant_id, 'kv_snapshots', session).
CREATE TABLE kv_snapshots (
    tenant_id     TEXT    NOT NULL,
    session       TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    sealed        BLOB    NOT NULL,
    PRIMARY KEY (tenant_id, session)
);
