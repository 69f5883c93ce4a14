-- The shared keyring: each tenant's data keys, wrapped under the KEK that
-- every gateway holds outside the database, and the encryptions reserved
-- under each key by all gateways together.
CREATE TABLE data_keys (
    tenant_id TEXT    NOT NULL,
    version   BIGINT  NOT NULL,
    kek_id    TEXT    NOT NULL,
    wrapped   TEXT    NOT NULL,
    reserved  BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, version)
);
