-- Where each task's callback stands (state, attempts, last_status, updated_at_ms).
ALTER TABLE tasks ADD COLUMN webhook JSONB;
