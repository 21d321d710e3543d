-- distrack schema, version 3: the wake-up says when the new tasks are due.
--
-- Idempotent and self-recording, like 0001: safe to apply by hand, from the postgres image's initdb
-- folder, or with `distrack migrate`.
--
-- The payload is the earliest scheduled_at of the statement's rows, as seconds since the epoch. A
-- coordinator already planning to wake before then does not wake (and query) for it: scheduling
-- tasks for later costs the coordinators nothing until they are nearly due. Still one NOTIFY per
-- statement, read from the statement's transition table.
CREATE OR REPLACE FUNCTION distrack_notify_task_queued() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('distrack_task_queued',
                      coalesce((SELECT EXTRACT(EPOCH FROM min(scheduled_at))::text FROM inserted), ''));
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_notify_queued ON tasks;
CREATE TRIGGER tasks_notify_queued
    AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION distrack_notify_task_queued();

INSERT INTO distrack_migrations (name) VALUES ('0003_notify_due_time') ON CONFLICT (name) DO NOTHING;
