-- The callback outbox: tasks whose callback is still to be delivered, by when it is next due.
CREATE INDEX IF NOT EXISTS tasks_callbacks_due
    ON tasks (((webhook->>'next_attempt_at_ms')::bigint))
    WHERE webhook->>'state' = 'pending';
