-- One row per change of the shared state, keyed by the dense sequence number Redis assigned it.
-- The consumer inserts with ON CONFLICT (seq) DO NOTHING, so redelivery never duplicates a row.
CREATE TABLE audit_log (
    seq bigint PRIMARY KEY CHECK (seq > 0),
    changed_at timestamptz NOT NULL,
    old_counter bigint NOT NULL,
    new_counter bigint NOT NULL,
    old_message text NOT NULL,
    new_message text NOT NULL,
    update_type text NOT NULL
);
