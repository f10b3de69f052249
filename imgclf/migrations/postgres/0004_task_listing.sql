-- The task monitor's pages: newest first, in every state and in one.
CREATE INDEX IF NOT EXISTS tasks_newest ON tasks (created_at_ms DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS tasks_newest_by_state ON tasks (state, created_at_ms DESC, task_id DESC);
