-- The index the store's reader walks (`cqrsctl.rebuild.reader`, see 0004): built CONCURRENTLY, so that appends go
-- on while it builds; a plain CREATE INDEX would hold every append for as long as the build of a large store takes.
-- Run outside a transaction, which CONCURRENTLY requires (`command_service.migrate`).
CREATE INDEX CONCURRENTLY IF NOT EXISTS events_xact_id_position ON events (xact_id, position);
