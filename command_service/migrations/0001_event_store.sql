-- Event store: the source of truth. One row per event; `position` is the global order of insertion.
CREATE TABLE events (
    position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    stream_type     text        NOT NULL,
    stream_id       text        NOT NULL,
    version         integer     NOT NULL CHECK (version >= 1),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL CHECK (schema_version >= 1),
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Optimistic concurrency: exactly one writer wins each version of a stream.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, version)
);

-- Idempotency: one row per client request_id, written in the command's transaction.
CREATE TABLE request_log (
    request_id    text        PRIMARY KEY,
    command_type  text        NOT NULL,
    request_hash  text        NOT NULL,
    stream_id     text        NOT NULL,
    reply         jsonb       NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Transactional outbox: events waiting for the JetStream ack. A row is deleted only after the ack, so the relay
-- needs no high-water mark and a transaction that commits late (lower position, later commit) is still seen.
CREATE TABLE outbox (
    position     bigint      PRIMARY KEY REFERENCES events (position),
    stream_id    text        NOT NULL,
    enqueued_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
