-- Two changes to how a batch is persisted (same functions, same results):
-- * The watermark advance reads the rows past the watermark (`seq > upto`): an index range scan
--   over a handful of rows. The planner could not see that when the table had no statistics yet
--   (a new deployment's first minutes) or once PL/pgSQL cached a generic plan (`seq > $1` is then
--   guessed at a third of the table): it scanned the whole table for every batch, a cost growing
--   with the log until the consumers fall behind. Sequential scans are now off in that step.
-- * audit_persist_batch inserts straight from the JSON rows instead of gathering them into seven
--   arrays for audit_persist to unnest again (a quarter less Postgres time per row).
-- audit_persist (arrays) stays for consumers of the release before 0005 during a rolling deploy;
-- it now hands its rows to audit_persist_batch, so one function inserts and advances.

-- After a batch is inserted, with the watermark's row locked (its value then is `upto_now`):
-- advance the watermark to the end of the gap-free run and return it. Rows past the watermark,
-- in order: those of the run starting right after it are the ones whose seq minus their rank
-- equals the watermark. In PL/pgSQL at READ COMMITTED each statement takes a fresh snapshot, so
-- this sees the batch's rows and every batch committed while the caller waited for the lock.
CREATE FUNCTION audit_advance_watermark(upto_now bigint) RETURNS bigint LANGUAGE plpgsql
SET enable_seqscan = off AS $$
BEGIN
    SELECT coalesce(max(seq), upto_now) INTO upto_now FROM (
        SELECT seq, seq - row_number() OVER (ORDER BY seq) AS run_start
        FROM audit_log WHERE seq > upto_now
    ) pending
    WHERE run_start = upto_now;
    UPDATE audit_watermark SET upto = upto_now;
    RETURN upto_now;
END
$$;

-- A batch as one JSON array of rows [seq, microseconds since the epoch, old_counter,
-- new_counter, old_message, new_message, update_type], every value a string as the outbox holds
-- it; integers are cast from their text and the time computed in integer microseconds.
CREATE OR REPLACE FUNCTION audit_persist_batch(batch jsonb) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    upto_now bigint;
BEGIN
    SELECT upto INTO upto_now FROM audit_watermark FOR UPDATE;  -- batches take turns
    INSERT INTO audit_log
        (seq, changed_at, old_counter, new_counter, old_message, new_message, update_type)
    SELECT (row->>0)::bigint,
           timestamptz 'epoch' + (row->>1)::bigint * interval '1 microsecond',
           (row->>2)::bigint, (row->>3)::bigint, row->>4, row->>5, row->>6
    FROM jsonb_array_elements(batch) AS row
    ON CONFLICT (seq) DO NOTHING;
    RETURN audit_advance_watermark(upto_now);
END
$$;

-- The previous releases' function: the same rows, handed on as JSON to the one that inserts.
CREATE OR REPLACE FUNCTION audit_persist(
    seqs bigint[], changed timestamptz[], old_counters bigint[], new_counters bigint[],
    old_messages text[], new_messages text[], update_types text[]
) RETURNS bigint LANGUAGE sql AS $$
    SELECT audit_persist_batch(coalesce(jsonb_agg(jsonb_build_array(
        seq::text, (extract(epoch FROM at) * 1000000)::bigint::text, old_counter::text,
        new_counter::text, old_message, new_message, update_type
    )), '[]'))
    FROM unnest(seqs, changed, old_counters, new_counters, old_messages, new_messages,
                update_types)
        AS row (seq, at, old_counter, new_counter, old_message, new_message, update_type)
$$;
