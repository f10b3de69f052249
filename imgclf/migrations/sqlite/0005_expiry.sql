-- When the sweeper deleted the task's image (IMGCLF_IMAGE_TTL); NULL while it is kept.
ALTER TABLE tasks ADD COLUMN image_deleted_at_ms INTEGER;
-- The sweeper's scans: final tasks by the time they ended (IMGCLF_RESULT_TTL, IMGCLF_IMAGE_TTL).
CREATE INDEX IF NOT EXISTS tasks_final_by_update
    ON tasks (updated_at_ms) WHERE state IN ('SUCCESS', 'FAILURE');
