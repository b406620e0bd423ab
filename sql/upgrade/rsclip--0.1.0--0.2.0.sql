-- rsclip 0.1.0 -> 0.2.0. What changed in the SQL (the rest of 0.2.0 is in the library):
-- - rsclip_cache_prune locks the cache table in SHARE ROW EXCLUSIVE mode (NOWAIT, retried), so
--   encoders skip their writes while it runs instead of waiting on the rows it deletes;
-- - rsclip_backfill_report keeps at most one state row per backend, so PUBLIC cannot grow
--   rsclip_backfill_state.
-- - the operator <#^ (<#> with NULLs first) in embedding_ip_ops, through which an rsclip index
--   serves ORDER BY rsclip_score(emb, q) DESC on a nullable column (the index format is now 5,
--   with a chain of the NULL rows: indexes of older formats say to REINDEX them);
-- tests/integration/test_upgrade.py checks that an upgraded 0.1.0 equals a fresh 0.2.0.
\echo Use "ALTER EXTENSION rsclip UPDATE TO '0.2.0'" to load this file. \quit

CREATE OR REPLACE FUNCTION rsclip_cache_prune(older_than interval DEFAULT NULL, max_rows bigint DEFAULT NULL)
    RETURNS bigint LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    removed bigint := 0;
    n bigint;
BEGIN
    IF older_than IS NOT NULL AND older_than < interval '0' THEN
        RAISE EXCEPTION 'rsclip_cache_prune: older_than must not be negative, not %', older_than
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_rows IS NOT NULL AND max_rows < 0 THEN
        RAISE EXCEPTION 'rsclip_cache_prune: max_rows must not be negative, not %', max_rows
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Encoders skip their cache writes while this runs instead of waiting on rows it deletes
    -- (they lock the table conditionally, in a mode this one conflicts with); lookups go on.
    -- NOWAIT, retried: a prune queued behind a transaction that holds the table (say, one idle
    -- after an encode) would make every encoder skip its writes for as long as it waited.
    FOR attempt IN 1..50 LOOP
        BEGIN
            LOCK TABLE @extschema@.rsclip_cache IN SHARE ROW EXCLUSIVE MODE NOWAIT;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            IF attempt = 50 THEN
                RAISE EXCEPTION 'rsclip_cache_prune: rsclip_cache stayed in use for 5 s (open transactions that encoded); try again'
                    USING ERRCODE = 'lock_not_available';
            END IF;
            PERFORM pg_sleep(0.1);
        END;
    END LOOP;
    IF older_than IS NOT NULL THEN
        DELETE FROM @extschema@.rsclip_cache WHERE last_used < now() - older_than;
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END IF;
    IF max_rows IS NOT NULL THEN
        DELETE FROM @extschema@.rsclip_cache
        WHERE ctid = ANY (ARRAY(SELECT ctid FROM @extschema@.rsclip_cache
                                ORDER BY last_used DESC, created DESC OFFSET max_rows));
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END IF;
    RETURN removed;
END
$$;

CREATE OR REPLACE FUNCTION rsclip_backfill_report(tbl oid, src name, dst name, kind text, batch_size int,
                                       rows_total bigint, rows_done bigint, rows_failed bigint, finished boolean)
    RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF rsclip_backfill_report.finished THEN
        DELETE FROM @extschema@.rsclip_backfill_state s
        WHERE s.pid = pg_backend_pid() AND s.tbl = rsclip_backfill_report.tbl AND s.dst = rsclip_backfill_report.dst;
        RETURN;
    END IF;
    DELETE FROM @extschema@.rsclip_backfill_state s
    WHERE s.pid = pg_backend_pid() AND (s.tbl, s.dst) IS DISTINCT FROM (rsclip_backfill_report.tbl, rsclip_backfill_report.dst);
    INSERT INTO @extschema@.rsclip_backfill_state AS s
        (pid, backend_start, tbl, src, dst, kind, batch_size, started, updated, rows_total, rows_done, rows_failed)
    SELECT pg_backend_pid(), a.backend_start, rsclip_backfill_report.tbl, rsclip_backfill_report.src,
           rsclip_backfill_report.dst, rsclip_backfill_report.kind, rsclip_backfill_report.batch_size,
           clock_timestamp(), clock_timestamp(), rsclip_backfill_report.rows_total,
           rsclip_backfill_report.rows_done, rsclip_backfill_report.rows_failed
    FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
    ON CONFLICT (pid, tbl, dst) DO UPDATE
        SET updated = clock_timestamp(), rows_done = excluded.rows_done, rows_failed = excluded.rows_failed,
            started = CASE WHEN s.backend_start = excluded.backend_start THEN s.started ELSE excluded.started END,
            backend_start = excluded.backend_start, rows_total = excluded.rows_total,
            batch_size = excluded.batch_size;
    IF rsclip_backfill_report.rows_done = 0 THEN
        -- at the start of a backfill, forget those whose backend is gone (the view hides them)
        DELETE FROM @extschema@.rsclip_backfill_state s
        WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = s.pid AND a.backend_start = s.backend_start);
    END IF;
END
$$;

CREATE FUNCTION embedding_negative_inner_product_nulls_first(embedding, embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'embedding_negative_inner_product_nulls_first' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE OPERATOR <#^ (LEFTARG = embedding, RIGHTARG = embedding,
    FUNCTION = embedding_negative_inner_product_nulls_first, COMMUTATOR = '<#^');
ALTER OPERATOR FAMILY embedding_ip_ops USING rsclip
    ADD OPERATOR 2 <#^ (embedding, embedding) FOR ORDER BY float_ops;

-- shared inference workers (0.2.0)
CREATE FUNCTION rsclip_inference_stats() RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rsclip_inference_stats' LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION rsclip_inference_stats() IS
    'per shared inference worker (rsclip.inference = worker): requests, batches, mean and max batch rows, queue wait p50/p99, model time, errors';

CREATE VIEW rsclip_inference_stats AS
    SELECT * FROM jsonb_to_recordset(@extschema@.rsclip_inference_stats()) AS w(
        worker int, running bool, device text, starts int, requests bigint, batches bigint,
        rows bigint, mean_batch_rows float8, max_batch_rows bigint, errors bigint,
        model_ms float8, model_loads bigint, queue_wait_p50_us bigint, queue_wait_p99_us bigint);
