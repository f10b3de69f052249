-- Tells every listener (imgclf-http's waits) of a task that has just become final, whichever
-- process finished it. A notification is sent when its transaction commits, so a listener that
-- reads the task on hearing of it finds it final.
CREATE OR REPLACE FUNCTION imgclf_task_final() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('imgclf_task_final', NEW.task_id::text);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER tasks_final AFTER UPDATE OF state ON tasks FOR EACH ROW
    WHEN (NEW.state IN ('SUCCESS', 'FAILURE') AND OLD.state IN ('PENDING', 'STARTED'))
    EXECUTE FUNCTION imgclf_task_final();
