-- distrack schema, version 4: each worker's latest heartbeat lists the tasks it holds.
--
-- Idempotent and self-recording, like 0001: safe to apply by hand, from the postgres image's initdb
-- folder, or with `distrack migrate`.
--
-- A worker starts a task as soon as it takes the dispatch. A claim whose dispatch may have been lost
-- goes back to the queue only once a heartbeat of its worker, sent after that dispatch could still
-- have arrived, does not list it; any coordinator can make that check, so the list is kept here.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS unfinished uuid[] NOT NULL DEFAULT '{}';

INSERT INTO distrack_migrations (name) VALUES ('0004_worker_unfinished') ON CONFLICT (name) DO NOTHING;
