-- distrack schema, version 2: a worker registry shared by every coordinator, leases, cancellation.
--
-- Idempotent and self-recording, like 0001: safe to apply by hand, from the postgres image's
-- initdb folder, or with `distrack migrate`.

-- Live workers, as heard by any coordinator. A worker heartbeats to one coordinator; that one
-- upserts its row here, and every coordinator reads this table to dispatch to every worker.
-- Liveness is judged on last_seen_at, on the database's clock.
CREATE TABLE IF NOT EXISTS workers (
    worker_id    text PRIMARY KEY,
    address      text NOT NULL,
    slots        integer NOT NULL CHECK (slots >= 0),
    -- How many tasks the worker said it was running in its last heartbeat.
    running      integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    joined_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);

-- The fencing token of a dispatch: one more at every claim, never reused. A worker may start a
-- task only once the coordinator has recorded its start under the lease it was given, and every
-- later change of that attempt names the lease, so no stale dispatch or report can act.
-- `attempts` counts the runs that actually started.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS lease bigint NOT NULL DEFAULT 0;

-- A cancel of a task that is picked or running: the coordinators tell its worker to kill it, and
-- the attempt then ends 'cancelled' rather than failed or retried.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS cancel_requested_at timestamptz;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS cancelled_at timestamptz;

INSERT INTO distrack_migrations (name) VALUES ('0002_workers_and_cancel') ON CONFLICT (name) DO NOTHING;
