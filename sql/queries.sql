-- Every statement distrack runs, by name. distrack/db/queries.py parses the `-- name --` headers
-- once; only distrack/db/store.py executes them. Parameters are psycopg's %(name)s placeholders.

-- insert_task --
INSERT INTO tasks (id, command, scheduled_at, max_attempts, timeout_seconds)
VALUES (%(id)s, %(command)s, now() + make_interval(secs => %(delay_seconds)s),
        %(max_attempts)s, %(timeout_seconds)s)
RETURNING id, command, scheduled_at, status, attempts, max_attempts, timeout_seconds;

-- get_task --
SELECT id, command, scheduled_at, picked_at, started_at, completed_at, failed_at,
       status, attempts, max_attempts, timeout_seconds, worker_id, exit_code, error
FROM tasks
WHERE id = %(id)s;

-- claim_due --
-- One statement, one short transaction: lock up to %(limit)s due rows that no other coordinator
-- holds, and mark them picked. The caller dispatches them after this commits.
WITH due AS (
    SELECT id
    FROM tasks
    WHERE status = 'queued' AND scheduled_at <= now()
    ORDER BY scheduled_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t
SET status = 'picked', picked_at = now(), attempts = t.attempts + 1,
    worker_id = NULL, exit_code = NULL
FROM due
WHERE t.id = due.id
RETURNING t.id, t.command, t.attempts, t.timeout_seconds, t.scheduled_at;

-- seconds_until_next_due --
-- NULL when nothing is queued; zero or less when something is already due.
SELECT EXTRACT(EPOCH FROM min(scheduled_at) - clock_timestamp())::double precision AS seconds
FROM tasks
WHERE status = 'queued';

-- unclaim --
-- A dispatch that reached no worker: back to the queue as if it had never been claimed, so it
-- costs no attempt. Only while it is still the picked attempt we claimed.
WITH back AS (
    UPDATE tasks
    SET status = 'queued', picked_at = NULL, attempts = attempts - 1
    WHERE id = %(id)s AND status = 'picked' AND attempts = %(attempt)s
    RETURNING id
)
SELECT count(*) AS n, pg_notify('distrack_task_queued', '') FROM back;

-- mark_running --
UPDATE tasks
SET status = 'running', started_at = now(), worker_id = %(worker_id)s
WHERE id = %(id)s AND status = 'picked' AND attempts = %(attempt)s
RETURNING id;

-- mark_completed --
UPDATE tasks
SET status = 'completed', completed_at = now(), started_at = coalesce(started_at, now()),
    worker_id = %(worker_id)s, exit_code = %(exit_code)s, error = NULL
WHERE id = %(id)s AND status IN ('picked', 'running') AND attempts = %(attempt)s
RETURNING id;

-- mark_failed --
-- A failure of the last attempt is final; an earlier one is retried after an exponential backoff.
UPDATE tasks
SET status       = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
    failed_at    = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END,
    scheduled_at = CASE WHEN attempts < max_attempts
                        THEN now() + make_interval(secs =>
                             %(retry_delay_s)s * 2 ^ (attempts - 1) * (0.75 + random() / 2))
                        ELSE scheduled_at END,
    picked_at    = CASE WHEN attempts < max_attempts THEN NULL ELSE picked_at END,
    started_at   = CASE WHEN attempts < max_attempts THEN NULL ELSE coalesce(started_at, now()) END,
    worker_id = %(worker_id)s, exit_code = %(exit_code)s, error = %(error)s
WHERE id = %(id)s AND status IN ('picked', 'running') AND attempts = %(attempt)s
RETURNING id, status;

-- release_worker_tasks --
-- A worker was declared lost: its unfinished attempts go back to the queue while attempts remain,
-- else fail with an error that says why.
UPDATE tasks
SET status    = CASE WHEN attempts < max_attempts THEN 'queued' ELSE 'failed' END,
    failed_at = CASE WHEN attempts < max_attempts THEN NULL ELSE now() END,
    picked_at = CASE WHEN attempts < max_attempts THEN NULL ELSE picked_at END,
    started_at = CASE WHEN attempts < max_attempts THEN NULL ELSE started_at END,
    error     = %(error)s
WHERE worker_id = %(worker_id)s AND status IN ('picked', 'running')
RETURNING id, status;

-- requeue_unacknowledged --
-- Picked but never reported started within the bound: the dispatch, or the coordinator that made
-- it, was lost. Retried while attempts remain, else failed with an error that says why.
WITH stale AS (
    SELECT id
    FROM tasks
    WHERE status = 'picked' AND picked_at < now() - make_interval(secs => %(ack_timeout_s)s)
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t
SET status    = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'failed' END,
    failed_at = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE now() END,
    picked_at = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE t.picked_at END,
    error     = %(error)s
FROM stale
WHERE t.id = stale.id
RETURNING t.id, t.status;

-- notify_queued --
SELECT pg_notify('distrack_task_queued', '');

-- ping --
SELECT 1;
