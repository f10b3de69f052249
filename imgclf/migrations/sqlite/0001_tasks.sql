-- Every accepted task, from upload to its final state.
CREATE TABLE tasks (
    task_id       TEXT PRIMARY KEY NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('PENDING', 'STARTED', 'SUCCESS', 'FAILURE')),
    object_key    TEXT NOT NULL,
    metadata      TEXT NOT NULL,           -- JSON object
    callback_url  TEXT,
    result        TEXT,                    -- JSON payload once SUCCESS
    error         TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

CREATE INDEX tasks_unfinished ON tasks (created_at_ms) WHERE state IN ('PENDING', 'STARTED');

-- The replaced service's table, kept readable for whatever still queries it.
CREATE VIEW results AS SELECT task_id, result AS payload FROM tasks WHERE state = 'SUCCESS';
