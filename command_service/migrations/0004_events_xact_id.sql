-- The transaction that wrote each event, so that a reader can follow the store without missing a late commit
-- (`cqrsctl.rebuild.reader`): positions come from an identity column, and a transaction that commits late makes a
-- lower position appear after higher ones were read. Every transaction whose id is below the snapshot's xmin has
-- ended, so the events with `xact_id < pg_snapshot_xmin(pg_current_snapshot())` are final; read in
-- (xact_id, position) order they never gain a row before the reader's cursor.
--
-- Rows written before this migration get the constant 0 (a "fast default": no table rewrite, and lower than any
-- real transaction id, so they come first and in position order); rows written afterwards get their writer's id
-- from the DEFAULT, so the command service's INSERT is unchanged. A subtransaction (the SAVEPOINT per append of a
-- group commit) reports its top-level transaction's id, which is what matters for visibility.
ALTER TABLE events ADD COLUMN IF NOT EXISTS xact_id xid8 NOT NULL DEFAULT '0'::xid8;
ALTER TABLE events ALTER COLUMN xact_id SET DEFAULT pg_current_xact_id();
-- The reader's index, (xact_id, position), is built by 0005 without holding up appends. (Stores migrated before
-- 2026-12-03 got it here, built while appends waited; 0005 finds it and does nothing.)
