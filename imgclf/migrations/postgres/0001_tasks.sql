-- Every accepted task, from upload to its final state.
CREATE TABLE tasks (
    task_id       UUID PRIMARY KEY,
    state         TEXT NOT NULL CHECK (state IN ('PENDING', 'STARTED', 'SUCCESS', 'FAILURE')),
    object_key    TEXT NOT NULL,
    metadata      JSONB NOT NULL,
    callback_url  TEXT,
    result        JSONB,
    error         TEXT,
    model         TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE INDEX tasks_unfinished ON tasks (created_at_ms) WHERE state IN ('PENDING', 'STARTED');

-- The replaced service's table, still written (once per task) for whatever reads it.
CREATE TABLE IF NOT EXISTS results (
    id      SERIAL PRIMARY KEY,
    task_id VARCHAR(64) UNIQUE NOT NULL,
    payload JSON NOT NULL
);
