-- Every statement distrack runs, by name. distrack/db/queries.py parses the `-- name --` headers
-- once; only distrack/db/store.py executes them. Parameters are psycopg's %(name)s placeholders.
--
-- Fencing: a dispatch is owned by (worker_id, lease) while the task is picked or running; the lease
-- grows at every claim and is never reused. Every statement that moves an attempt on names that
-- owner in its WHERE clause, so a late, repeated or stale dispatch, report or rescue changes nothing.
-- `attempts` counts runs that started (a start report, or a final report carrying the start), so a
-- dispatch that never started costs none. Claims commit durably: a worker runs what it is dispatched
-- at once (or, when its slots are full, as one frees), so the claim is what must never be lost.

-- insert_tasks --
-- A batch in one statement: one transaction, and one NOTIFY from the statement-level trigger (POST
-- /tasks, and the scheduler's group insert of single POST /schedule requests that arrived together).
-- The batch comes as parallel array literals, ids included (the caller makes them), and nothing comes
-- back row by row: each task is due its delay, in whole microseconds, after the transaction's now(),
-- which the statement returns, so the caller knows every new task's id and scheduled_at. Parsing
-- arrays costs PostgreSQL less than JSON, and reading thousands of rows back, or building the API's
-- JSON here, cost it more than the insert itself.
WITH inserted AS (
    INSERT INTO tasks (id, command, scheduled_at, max_attempts, timeout_seconds)
    SELECT b.id, b.command, now() + b.delay_us * interval '1 microsecond', b.max_attempts, b.timeout_seconds
    FROM unnest(%(ids)s::uuid[], %(commands)s::text[], %(delays_us)s::bigint[], %(max_attempts)s::int[],
                %(timeouts)s::float8[]) AS b (id, command, delay_us, max_attempts, timeout_seconds)
    RETURNING 1
)
SELECT count(*) AS count, now() AS now
FROM inserted;

-- get_task --
SELECT id, command, scheduled_at, picked_at, started_at, completed_at, failed_at,
       cancel_requested_at, cancelled_at,
       status, attempts, max_attempts, timeout_seconds, worker_id, exit_code, error
FROM tasks
WHERE id = %(id)s;

-- claim_due --
-- One statement, one short transaction: lock as many due rows as there are worker slots reserved
-- (rows another coordinator holds are skipped), mark them picked and give the n-th one the n-th
-- reserved worker. The caller dispatches them after this commits. The last row (id NULL) says how
-- long until the next queued task not claimed here is due (NULL when none; zero or less when one is
-- due already), so the loop knows how long it may sleep without asking again, and whether a task that
-- was due when the claim looked (now()) was left: held by another coordinator, or beyond the slots. A
-- task that fell due while the statement ran (after now(), by clock_timestamp()) was not left: it is
-- claimable at once.
WITH due AS (
    SELECT id, scheduled_at
    FROM tasks
    WHERE status = 'queued' AND scheduled_at <= now()
    ORDER BY scheduled_at
    LIMIT cardinality(%(worker_ids)s::text[])
    FOR UPDATE SKIP LOCKED
),
numbered AS (
    SELECT id, row_number() OVER (ORDER BY scheduled_at, id) AS n FROM due
),
assigned AS (
    SELECT numbered.id, slot.worker_id
    FROM numbered
    JOIN unnest(%(worker_ids)s::text[]) WITH ORDINALITY AS slot (worker_id, n) USING (n)
),
claimed AS (
    UPDATE tasks AS t
    SET status = 'picked', picked_at = now(), lease = t.lease + 1,
        worker_id = assigned.worker_id, exit_code = NULL
    FROM assigned
    WHERE t.id = assigned.id
    RETURNING t.id, t.command, t.lease, t.attempts + 1 AS attempt, t.timeout_seconds, t.scheduled_at, t.worker_id
)
SELECT id, command, lease, attempt, timeout_seconds, scheduled_at, worker_id, NULL::float8 AS next_due_s,
       NULL::boolean AS left_due
FROM claimed
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       EXTRACT(EPOCH FROM next.scheduled_at - clock_timestamp())::float8, coalesce(next.scheduled_at <= now(), false)
FROM (
    -- min() alone, so PostgreSQL reads one entry of the partial index, not the whole queue (another
    -- aggregate beside it would make it read every queued row: tasks scheduled for later included).
    -- A due task was left exactly when the earliest one left is due.
    SELECT min(scheduled_at) AS scheduled_at
    FROM tasks
    WHERE status = 'queued' AND id <> ALL (ARRAY(SELECT id FROM due))
) AS next;

-- seconds_until_next_due --
-- NULL when nothing is queued; zero or less when something is already due.
SELECT EXTRACT(EPOCH FROM min(scheduled_at) - clock_timestamp())::double precision AS seconds
FROM tasks
WHERE status = 'queued';

-- reassign --
-- The worker refused the dispatch (its answer says it did not take it), so the same lease goes to
-- another worker.
UPDATE tasks
SET worker_id = %(new_worker_id)s
WHERE id = %(id)s AND status = 'picked' AND lease = %(lease)s AND worker_id = %(worker_id)s
  AND cancel_requested_at IS NULL
RETURNING id;

-- unclaim --
-- A dispatch no worker took, or one its worker does not hold: back to the queue as if never claimed,
-- so it costs no attempt (or cancelled, if that was asked meanwhile).
UPDATE tasks
SET status       = CASE WHEN cancel_requested_at IS NULL THEN 'queued' ELSE 'cancelled' END,
    cancelled_at = CASE WHEN cancel_requested_at IS NULL THEN NULL ELSE now() END,
    picked_at    = NULL,
    worker_id    = NULL
WHERE id = %(id)s AND status = 'picked' AND lease = %(lease)s AND worker_id = %(worker_id)s
RETURNING id;

-- mark_running --
-- A batch of start reports. The worker started each command as it took the dispatch (the claim, with
-- its lease, is what lets it run); this records when, on the worker's clock, kept between picked_at
-- and now so a clock off the database's never puts a start before the claim (and so before
-- scheduled_at) or in the future. Idempotent for the owner (a retried report whose answer was lost);
-- refused to anyone else and once a cancel was asked, which stops the run. The commit need not wait
-- for the disk: a start lost in a crash leaves the task picked by the same worker, which lists it in
-- its heartbeats and whose final report records the start too.
UPDATE tasks AS t
SET status     = 'running',
    started_at = CASE WHEN t.status = 'picked'
                      THEN least(greatest(coalesce(to_timestamp(a.started_at), now()), t.picked_at), now())
                      ELSE t.started_at END,
    attempts   = CASE WHEN t.status = 'picked' THEN t.attempts + 1 ELSE t.attempts END
FROM unnest(%(ids)s::uuid[], %(leases)s::bigint[], %(worker_ids)s::text[], %(started_ats)s::float8[])
     AS a (id, lease, worker_id, started_at),
     (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit
WHERE t.id = a.id AND t.status IN ('picked', 'running') AND t.lease = a.lease AND t.worker_id = a.worker_id
  AND t.cancel_requested_at IS NULL
RETURNING t.id;

-- cancel_refused_starts --
-- mark_running refused these because a cancel was asked: that was the owner's start (or its retry,
-- the first answer lost), which the refusal stops, so the task is cancelled now.
UPDATE tasks AS t
SET status = 'cancelled', cancelled_at = now()
FROM unnest(%(ids)s::uuid[], %(leases)s::bigint[], %(worker_ids)s::text[]) AS a (id, lease, worker_id)
WHERE t.id = a.id AND t.status IN ('picked', 'running') AND t.lease = a.lease AND t.worker_id = a.worker_id
  AND t.cancel_requested_at IS NOT NULL
RETURNING t.id;

-- mark_completed --
-- A task still picked had its start report lost or overtaken: the start is recorded with the end.
UPDATE tasks AS t
SET status = 'completed', completed_at = now(), exit_code = a.exit_code, error = NULL,
    started_at = CASE WHEN t.status = 'picked'
                      THEN least(greatest(coalesce(to_timestamp(a.started_at), now()), t.picked_at), now())
                      ELSE t.started_at END,
    attempts   = CASE WHEN t.status = 'picked' THEN t.attempts + 1 ELSE t.attempts END
FROM unnest(%(ids)s::uuid[], %(leases)s::bigint[], %(worker_ids)s::text[], %(exit_codes)s::int[],
            %(started_ats)s::float8[]) AS a (id, lease, worker_id, exit_code, started_at)
WHERE t.id = a.id AND t.status IN ('picked', 'running') AND t.lease = a.lease AND t.worker_id = a.worker_id
RETURNING t.id;

-- end_attempts --
-- Ends started attempts that did not succeed (a failed command, a timeout, a lost worker), each
-- only while it is still that worker's current lease. A cancel asked for makes it 'cancelled';
-- attempts left make it 'queued' again after an exponential backoff with jitter, capped; otherwise
-- it is 'failed'. An attempt still picked (its start report lost or overtaken by this one) counts as
-- started, when the worker says it started (started_at given). FOR UPDATE re-checks the fence after
-- any lock wait.
WITH ended AS (
    SELECT *
    FROM unnest(%(ids)s::uuid[], %(leases)s::bigint[], %(worker_ids)s::text[], %(exit_codes)s::int[],
                %(errors)s::text[], %(started_ats)s::float8[]) AS e (id, lease, worker_id, exit_code, error, started_at)
),
current AS (
    SELECT t.id, e.exit_code, e.error, t.cancel_requested_at, t.max_attempts,
           t.attempts + (t.status = 'picked')::int AS attempts,
           CASE WHEN t.status = 'picked'
                THEN least(greatest(to_timestamp(e.started_at), t.picked_at), now())
                ELSE t.started_at END AS started_at
    FROM tasks AS t
    JOIN ended AS e ON e.id = t.id
    WHERE t.lease = e.lease AND t.worker_id = e.worker_id
      AND (t.status = 'running' OR (t.status = 'picked' AND e.started_at IS NOT NULL))
    FOR UPDATE OF t
),
outcome AS (
    SELECT id, exit_code, error, attempts, started_at,
           CASE WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
                WHEN attempts < max_attempts THEN 'queued'
                ELSE 'failed' END AS status,
           least(%(retry_delay_s)s * 2 ^ least(attempts - 1, 30) * (0.75 + random() / 2),
                 %(max_retry_delay_s)s) AS backoff_s
    FROM current
)
UPDATE tasks AS t
SET status       = o.status,
    attempts     = o.attempts,
    scheduled_at = CASE WHEN o.status = 'queued' THEN now() + make_interval(secs => o.backoff_s)
                        ELSE t.scheduled_at END,
    picked_at    = CASE WHEN o.status = 'queued' THEN NULL ELSE t.picked_at END,
    started_at   = CASE WHEN o.status = 'queued' THEN NULL ELSE o.started_at END,
    failed_at    = CASE WHEN o.status = 'failed' THEN now() END,
    cancelled_at = CASE WHEN o.status = 'cancelled' THEN now() END,
    exit_code    = o.exit_code,
    error        = o.error
FROM outcome AS o
WHERE t.id = o.id
RETURNING t.id, t.status;

-- orphaned_attempts --
-- Attempts whose worker is gone: no heartbeat within the ttl, or not registered at all.
SELECT t.id, t.lease, t.worker_id, t.status,
       EXTRACT(EPOCH FROM now() - w.last_seen_at)::double precision AS silent_s
FROM tasks AS t
LEFT JOIN workers AS w ON w.worker_id = t.worker_id
WHERE t.status IN ('picked', 'running') AND t.worker_id IS NOT NULL
  AND (w.worker_id IS NULL OR w.last_seen_at <= now() - make_interval(secs => %(ttl_s)s));

-- unacknowledged_attempts --
-- Picked a while ago and never reported started, by a worker that does not hold it: a heartbeat of
-- that worker, recorded late enough that it was sent after the dispatch's deadline (half the bound
-- after the claim), does not list it. The dispatch, or the coordinator that made it, was lost. A
-- worker lists every task it took until its final report is settled, and refuses a dispatch whose
-- deadline has passed, so a task it may run is never taken back here.
SELECT t.id, t.lease, t.worker_id
FROM tasks AS t
JOIN workers AS w ON w.worker_id = t.worker_id
WHERE t.status = 'picked' AND w.last_seen_at >= t.picked_at + make_interval(secs => %(ack_timeout_s)s)
  AND NOT (t.id = ANY (w.unfinished));

-- unlisted_runs --
-- Running attempts of a live worker that its heartbeat no longer lists. A worker lists every task
-- until its final report is acknowledged, so it has lost these (a report it gave up on). Only
-- those started a while ago: a start recorded after the heartbeat was built is not listed yet.
SELECT id, lease, worker_id
FROM tasks
WHERE worker_id = %(worker_id)s AND status = 'running' AND id <> ALL (%(task_ids)s::uuid[])
  AND started_at < now() - make_interval(secs => %(grace_s)s);

-- worker_attempts --
SELECT id, lease, worker_id, status
FROM tasks
WHERE status IN ('picked', 'running') AND worker_id = %(worker_id)s;

-- upsert_worker --
-- A heartbeat. `joined` is true when the row is new (xmax is 0 only for a freshly inserted row).
INSERT INTO workers AS w (worker_id, address, slots, prefetch, running, unfinished)
VALUES (%(worker_id)s, %(address)s, %(slots)s, %(prefetch)s, %(running)s, %(unfinished)s::uuid[])
ON CONFLICT (worker_id) DO UPDATE
SET address = EXCLUDED.address, slots = EXCLUDED.slots, prefetch = EXCLUDED.prefetch, running = EXCLUDED.running,
    unfinished = EXCLUDED.unfinished, last_seen_at = now()
RETURNING (xmax = 0) AS joined;

-- runs_to_stop --
-- Of the tasks a worker says it runs, those it no longer owns (rescued, reassigned, finished
-- elsewhere) or whose cancel was asked (cancel_asked: still its own, but to stop as cancelled).
SELECT r.id, t.id IS NOT NULL AS cancel_asked
FROM unnest(%(task_ids)s::uuid[]) AS r (id)
LEFT JOIN tasks AS t
    ON t.id = r.id AND t.worker_id = %(worker_id)s AND t.status IN ('picked', 'running')
WHERE t.id IS NULL OR t.cancel_requested_at IS NOT NULL;

-- live_workers --
-- Every coordinator's view of the workers: those heard from within the ttl, in the order they
-- joined (the round-robin order), with how many tasks each one takes (its slots and its prefetch) and
-- the tasks it holds right now.
SELECT w.worker_id, w.address, w.slots + w.prefetch AS takes, w.running,
       coalesce(array_agg(t.id) FILTER (WHERE t.id IS NOT NULL), '{}') AS active_task_ids
FROM workers AS w
LEFT JOIN tasks AS t ON t.worker_id = w.worker_id AND t.status IN ('picked', 'running')
WHERE w.last_seen_at > now() - make_interval(secs => %(ttl_s)s)
GROUP BY w.worker_id
ORDER BY w.joined_at, w.worker_id;

-- delete_stale_workers --
DELETE FROM workers
WHERE last_seen_at <= now() - make_interval(secs => %(ttl_s)s)
RETURNING worker_id, address, EXTRACT(EPOCH FROM now() - last_seen_at)::double precision AS silent_s;

-- delete_worker --
DELETE FROM workers WHERE worker_id = %(worker_id)s RETURNING worker_id;

-- cancel_task --
-- Queued: cancelled at once. Picked or running: the request is recorded and the running attempt is
-- stopped by its worker, then ends 'cancelled'. Finished tasks are not changed (no row returned).
UPDATE tasks
SET status              = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,
    cancelled_at        = CASE WHEN status = 'queued' THEN now() ELSE cancelled_at END,
    cancel_requested_at = coalesce(cancel_requested_at, now())
WHERE id = %(id)s AND status IN ('queued', 'picked', 'running')
RETURNING id, status, worker_id;

-- cancels_pending --
-- Picked or running tasks whose cancel was asked: their workers still have to stop them.
SELECT id, worker_id
FROM tasks
WHERE status IN ('picked', 'running') AND cancel_requested_at IS NOT NULL;

-- notify_cancel --
SELECT pg_notify('distrack_cancel', %(id)s::text);

-- ping --
SELECT 1;

-- set_statement_timeout --
-- For the session of a new pooled connection: a statement running longer is cancelled.
SELECT set_config('statement_timeout', %(timeout)s, false);
