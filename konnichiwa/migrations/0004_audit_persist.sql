-- A consumer's whole batch in one round trip: take the watermark's row lock (batches take turns,
-- so each one sees every batch committed before it), insert the rows a crashed consumer may have
-- inserted already, advance the watermark to the end of the gap-free run, and return it.
-- In PL/pgSQL at READ COMMITTED each statement takes a fresh snapshot, so the advance sees this
-- batch's rows and every batch committed while it waited for the lock.
CREATE FUNCTION audit_persist(
    seqs bigint[], changed timestamptz[], old_counters bigint[], new_counters bigint[],
    old_messages text[], new_messages text[], update_types text[]
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    upto_now bigint;
BEGIN
    SELECT upto INTO upto_now FROM audit_watermark FOR UPDATE;
    INSERT INTO audit_log
        (seq, changed_at, old_counter, new_counter, old_message, new_message, update_type)
    SELECT * FROM unnest(seqs, changed, old_counters, new_counters,
                         old_messages, new_messages, update_types)
    ON CONFLICT (seq) DO NOTHING;
    -- Rows past the watermark, in order: those of the gap-free run starting right after it are
    -- the ones whose seq minus their rank equals the watermark. Only rows not yet covered by the
    -- watermark are read (an index range scan), never the whole table.
    SELECT coalesce(max(seq), upto_now) INTO upto_now FROM (
        SELECT seq, seq - row_number() OVER (ORDER BY seq) AS run_start
        FROM audit_log WHERE seq > upto_now
    ) pending
    WHERE run_start = upto_now;
    UPDATE audit_watermark SET upto = upto_now;
    RETURN upto_now;
END
$$;
