-- The Files and Batch APIs. A file's name and bytes are sealed under its
-- tenant's data key (bound to (tenant_id, 'files', id) and
-- (tenant_id, 'files.content', id)); a batch's object likewise. A batch's
-- status is in the clear: every gateway's runner looks for unfinished
-- batches of every tenant. A finished line is kept once (its primary key):
-- a batch resumed after a crash runs only the lines without a row.
CREATE TABLE files (
    tenant_id     TEXT   NOT NULL,
    id            TEXT   NOT NULL,
    created_at_ms INTEGER NOT NULL,
    purpose       TEXT   NOT NULL,
    bytes         INTEGER NOT NULL,
    sealed_name   BLOB  NOT NULL,
    sealed        BLOB  NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX files_by_time ON files (tenant_id, created_at_ms);

CREATE TABLE batches (
    tenant_id     TEXT   NOT NULL,
    id            TEXT   NOT NULL,
    created_at_ms INTEGER NOT NULL,
    status        TEXT   NOT NULL,
    sealed        BLOB  NOT NULL,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX batches_by_time ON batches (tenant_id, created_at_ms);
CREATE INDEX batches_by_status ON batches (status);

CREATE TABLE batch_lines (
    tenant_id TEXT    NOT NULL,
    batch_id  TEXT    NOT NULL,
    line      INTEGER  NOT NULL,
    ok        INTEGER  NOT NULL,
    sealed    BLOB   NOT NULL,
    PRIMARY KEY (tenant_id, batch_id, line)
);
