-- audit_persist for a batch sent as one JSON array of rows [seq, microseconds since the epoch,
-- old_counter, new_counter, old_message, new_message, update_type], every value a string as the
-- outbox stream holds it: the consumer passes the stream's values on without parsing them, and
-- the driver encodes one text value instead of seven arrays element by element. Integers are
-- cast from their text and the time computed in integer microseconds: nothing goes through a
-- floating-point number.
CREATE FUNCTION audit_persist_batch(batch jsonb) RETURNS bigint LANGUAGE sql AS $$
    SELECT audit_persist(
        array_agg((row->>0)::bigint),
        array_agg(timestamptz 'epoch' + (row->>1)::bigint * interval '1 microsecond'),
        array_agg((row->>2)::bigint),
        array_agg((row->>3)::bigint),
        array_agg(row->>4),
        array_agg(row->>5),
        array_agg(row->>6)
    )
    FROM jsonb_array_elements(batch) AS row
$$;
