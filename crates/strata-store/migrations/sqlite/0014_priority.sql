-- A tenant or key set to `sheddable` is refused first under overload.
ALTER TABLE tenants ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive';
ALTER TABLE api_keys ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive';
