-- The answers of POST /user requests sent with an Idempotency-Key, written in the same transaction
-- as the user they created: no crash can keep one without the other. A request claims its key by
-- inserting the row (a concurrent one with the same key waits on it, then finds the answer);
-- rows older than the service's keeping time are claimed afresh, and deleted in the background.
CREATE TABLE idempotency_records (
    key text PRIMARY KEY,
    fingerprint text NOT NULL,
    body bytea NOT NULL DEFAULT '',
    location text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_records_created_at ON idempotency_records (created_at);
