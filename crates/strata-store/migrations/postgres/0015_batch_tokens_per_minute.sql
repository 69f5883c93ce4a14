-- A tenant's or key's batch lines may have a token limit of their own.
ALTER TABLE tenants ADD COLUMN batch_tokens_per_minute BIGINT;
ALTER TABLE api_keys ADD COLUMN batch_tokens_per_minute BIGINT;
