-- A gateway reports its whole load (model '') and each catalog model's
-- share, so a cluster's controller scales each model's pool by its own.
ALTER TABLE gateway_loads ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE gateway_loads DROP CONSTRAINT gateway_loads_pkey;
ALTER TABLE gateway_loads ADD PRIMARY KEY (gateway, model);
