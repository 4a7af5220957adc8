-- The outbox row of an event is written by the same statement as the event itself (event_store.append_batch),
-- so the foreign key to `events` can never fail; checking it cost a lookup per event on the append path.
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_position_fkey;
