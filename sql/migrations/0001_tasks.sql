-- distrack schema, version 1: the tasks table, the claim index and the wake-up trigger.
--
-- Plain PostgreSQL: `psql -v ON_ERROR_STOP=1 -f sql/migrations/0001_tasks.sql` applies it by hand,
-- the postgres image applies it from /docker-entrypoint-initdb.d, and `distrack migrate` applies it
-- once, in order. Every statement is idempotent and the file records itself, so running it again
-- by any of those routes changes nothing.

CREATE TABLE IF NOT EXISTS distrack_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tasks (
    -- The seed's columns.
    id              uuid PRIMARY KEY,
    command         text NOT NULL CHECK (command <> ''),
    scheduled_at    timestamptz NOT NULL,
    picked_at       timestamptz,
    started_at      timestamptz,
    completed_at    timestamptz,
    failed_at       timestamptz,
    -- Where the task is in its lifecycle (SPEC.md, "Task lifecycle").
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'picked', 'running', 'completed', 'failed', 'cancelled')),
    -- Attempts made so far; a claim adds one, so it doubles as the number of the current attempt.
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts    integer NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    timeout_seconds double precision CHECK (timeout_seconds > 0),
    worker_id       text,
    exit_code       integer,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The claim reads only due, queued rows in scheduled_at order. A partial index keeps that read
-- proportional to the queue, not to the history the table has piled up.
CREATE INDEX IF NOT EXISTS tasks_queued_scheduled_at_idx
    ON tasks (scheduled_at) WHERE status = 'queued';

-- Rows still owned by a worker, for finding what a lost worker left behind.
CREATE INDEX IF NOT EXISTS tasks_active_worker_idx
    ON tasks (worker_id) WHERE status IN ('picked', 'running');

-- One NOTIFY per statement, not per row: NOTIFY takes a database-wide lock at commit, and a batch
-- insert needs one wake-up, not thousands. Coordinators LISTEN on this channel.
CREATE OR REPLACE FUNCTION distrack_notify_task_queued() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('distrack_task_queued', '');
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS tasks_notify_queued ON tasks;
CREATE TRIGGER tasks_notify_queued
    AFTER INSERT ON tasks
    FOR EACH STATEMENT EXECUTE FUNCTION distrack_notify_task_queued();

INSERT INTO distrack_migrations (name) VALUES ('0001_tasks') ON CONFLICT (name) DO NOTHING;
