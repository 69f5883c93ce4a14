-- What each instance is and costs, for the cost ledger.
ALTER TABLE instances ADD COLUMN pool TEXT NOT NULL DEFAULT 'default';
ALTER TABLE instances ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN instance_type TEXT NOT NULL DEFAULT 'local';
ALTER TABLE instances ADD COLUMN zone TEXT NOT NULL DEFAULT 'local';
ALTER TABLE instances ADD COLUMN capacity TEXT NOT NULL DEFAULT 'on_demand';
ALTER TABLE instances ADD COLUMN price_per_hour REAL NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN tokens_per_s REAL NOT NULL DEFAULT 0;
CREATE INDEX usage_by_time ON usage (at_ms);
