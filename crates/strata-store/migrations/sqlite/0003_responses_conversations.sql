-- Responses and Conversations APIs. Every `sealed` column is AES-256-GCM
-- under the tenant's data key, bound to (tenant_id, table, id).
CREATE TABLE responses (
    tenant_id       TEXT    NOT NULL,
    id              TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    model           TEXT    NOT NULL,
    conversation_id TEXT,
    replica         TEXT,
    sealed          BLOB    NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX responses_by_conversation ON responses (tenant_id, conversation_id, created_at_ms);

CREATE TABLE conversations (
    tenant_id     TEXT    NOT NULL,
    id            TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    sealed        BLOB    NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

-- `seq` orders a conversation's items; ids are unique per tenant.
CREATE TABLE conversation_items (
    tenant_id       TEXT    NOT NULL,
    conversation_id TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    id              TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    sealed          BLOB    NOT NULL,
    PRIMARY KEY (tenant_id, conversation_id, seq),
    UNIQUE (tenant_id, id)
);
