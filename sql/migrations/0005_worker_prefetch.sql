-- distrack schema, version 5: how many tasks each worker takes beyond its slots.
--
-- Idempotent and self-recording, like 0001: safe to apply by hand, from the postgres image's initdb
-- folder, or with `distrack migrate`.
--
-- A worker may take a few more tasks than it has slots; each waits on the worker and starts as a slot
-- frees, so the slots stay busy while the coordinator records an end and sends the next task. Every
-- coordinator counts them among the worker's free room, so the number is kept here with the slots.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS prefetch integer NOT NULL DEFAULT 0;

INSERT INTO distrack_migrations (name) VALUES ('0005_worker_prefetch') ON CONFLICT (name) DO NOTHING;
