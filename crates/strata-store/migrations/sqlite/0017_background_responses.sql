-- Background responses: `background` is 'running' or 'cancelling' while a
-- gateway runs the response, NULL once it has ended (or for a response
-- that never ran in the background). Their events are kept, sealed, one
-- row per sequence number, where every gateway reads them: a client
-- resumes the stream from any gateway, and a gateway that takes over a
-- response whose gateway died goes on after the last one kept.
ALTER TABLE responses ADD COLUMN background TEXT;
CREATE INDEX responses_running ON responses (background) WHERE background IS NOT NULL;
CREATE TABLE response_events (
    tenant_id   TEXT   NOT NULL,
    response_id TEXT   NOT NULL,
    seq         INTEGER NOT NULL,
    sealed      BLOB   NOT NULL,
    PRIMARY KEY (tenant_id, response_id, seq)
);
