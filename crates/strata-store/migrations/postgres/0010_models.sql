-- Models deployed at run time (`POST /admin/v1/models`, `strata model
-- deploy`): every gateway and the process running the pools read the same
-- catalog. `spec` is the model's entry as JSON (the `[[models]]` form).
CREATE TABLE models (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
