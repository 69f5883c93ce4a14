-- No query reads usage by model and time (totals by model scan a tenant's
-- rows or all of them); the index only cost every metered request a write.
DROP INDEX usage_by_model_time;
