-- Values that must be unique across streams (e.g. customer emails), claimed in the same transaction as the
-- events that introduce them and released when they change, so uniqueness is enforced atomically with the append.
CREATE TABLE unique_claims (
    scope            text        NOT NULL,
    value            text        NOT NULL,
    owner_stream_id  text        NOT NULL,
    claimed_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (scope, value)
);
