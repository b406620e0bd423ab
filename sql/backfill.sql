-- rsclip_backfill: fill an embedding column from an image (bytea) or text column in batches,
-- committing after every batch, so an interrupted run loses at most one batch and the next CALL
-- goes on where it stopped (rows whose destination is still NULL).
--
-- Work is claimed with FOR UPDATE SKIP LOCKED over bounded ctid ranges (a TID range scan, so a
-- claim never rereads the whole table): several backfills of one table (one per backend, one
-- per GPU) share the rows without processing any twice. Batches are claimed two ahead of the one
-- being written: while the procedure writes a batch, commits and claims the next, the batch after
-- it runs through the model on a background thread and the one after that decodes on others.
-- Row locks end with each commit, so those of the batches ahead are taken again (SKIP LOCKED),
-- and rows another backfill took meanwhile are dropped. Rows whose image cannot be decoded keep a NULL
-- destination and are logged in rsclip_backfill_errors; later runs skip them until the row
-- changes (a new ctid). Progress: a NOTICE every few seconds and the rsclip_backfill_progress
-- view. The procedure runs with the caller's rights on the table.

CREATE TABLE rsclip_backfill_state (
    pid int NOT NULL,
    backend_start timestamptz NOT NULL,
    tbl oid NOT NULL,
    src name NOT NULL,
    dst name NOT NULL,
    kind text NOT NULL,
    batch_size int NOT NULL,
    started timestamptz NOT NULL,
    updated timestamptz NOT NULL,
    rows_total bigint NOT NULL,
    rows_done bigint NOT NULL DEFAULT 0,
    rows_failed bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (pid, tbl, dst)
);
REVOKE ALL ON rsclip_backfill_state FROM PUBLIC;

CREATE TABLE rsclip_backfill_error_log (
    tbl oid NOT NULL,
    row_ctid tid NOT NULL,
    row_key jsonb,
    message text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rsclip_backfill_error_log_tbl ON rsclip_backfill_error_log (tbl, row_ctid);
REVOKE ALL ON rsclip_backfill_error_log FROM PUBLIC;
-- The procedure runs with the caller's rights and logs the rows it could not embed: anyone may
-- insert, but only for a table whose columns the current role may update (the check runs as the
-- inserting role, so SET ROLE and SECURITY DEFINER callers are judged by their current role).
-- Reading goes through the rsclip_backfill_errors view.
GRANT INSERT ON rsclip_backfill_error_log TO PUBLIC;
ALTER TABLE rsclip_backfill_error_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY rsclip_backfill_error_log_insert ON rsclip_backfill_error_log FOR INSERT TO PUBLIC
    WITH CHECK (pg_catalog.has_any_column_privilege(tbl, 'UPDATE'));

-- Each role sees the rows of the tables it may read (has_table_privilege runs as the reader).
CREATE VIEW rsclip_backfill_errors AS
    SELECT e.tbl::regclass AS tbl, e.row_ctid, e.row_key, e.message, e.at
    FROM @extschema@.rsclip_backfill_error_log e
    WHERE pg_catalog.has_table_privilege(e.tbl, 'SELECT');
GRANT SELECT ON rsclip_backfill_errors TO PUBLIC;

CREATE VIEW rsclip_backfill_progress AS
    SELECT s.pid, s.tbl::regclass AS tbl, s.src, s.dst, s.kind, s.batch_size, s.started, s.updated,
           s.rows_total, s.rows_done, s.rows_failed,
           s.rows_done / greatest(extract(epoch FROM s.updated - s.started), 0.001) AS rows_per_second,
           CASE WHEN s.rows_done > 0 THEN
               (s.updated - s.started) * ((greatest(s.rows_total - s.rows_done - s.rows_failed, 0))::float8 / s.rows_done)
           END AS eta
    FROM @extschema@.rsclip_backfill_state s
    JOIN pg_catalog.pg_stat_activity a ON a.pid = s.pid AND a.backend_start = s.backend_start
    WHERE pg_catalog.has_table_privilege(s.tbl, 'SELECT');
GRANT SELECT ON rsclip_backfill_progress TO PUBLIC;

-- Progress bookkeeping for the procedure (SECURITY DEFINER: the state table is private).
-- Callable by PUBLIC because rsclip_backfill runs with its caller's rights, and harmless by
-- construction: it only touches the calling backend's own rows, and a backend holds at most one
-- (a backend runs one backfill at a time, so starting one drops its others), so no role can
-- grow the table beyond one row per connection; rows of backends that are gone are removed.
CREATE FUNCTION rsclip_backfill_report(tbl oid, src name, dst name, kind text, batch_size int,
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

-- Callable by PUBLIC (rsclip_backfill runs with its caller's rights) and harmless by
-- construction: it encodes the inputs it is given, exactly as the public rsclip_encode_images /
-- rsclip_encode_texts do, reads and writes no table, and its background work belongs to the
-- calling backend only.
CREATE FUNCTION rsclip_backfill_encode(inputs bytea[], kind text, prefetch bytea[],
                                       OUT embeddings embedding[], OUT errors text[])
    AS 'MODULE_PATHNAME', 'rsclip_backfill_encode' LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
COMMENT ON FUNCTION rsclip_backfill_encode(bytea[], text, bytea[]) IS
    'one batch of rsclip_backfill: embeddings (NULL where an input failed) and error messages; prefetch (a later batch) is decoded and encoded in the background meanwhile; empty inputs and prefetch forget what was handed over';

-- The rows of a claimed batch whose ctid is in kept, in their order (a relock dropped the others).
-- A pure function of its arguments (IMMUTABLE, no table access): harmless for PUBLIC to call.
CREATE FUNCTION rsclip_backfill_keep(ctids tid[], xmins xid[], inputs bytea[], keys jsonb[], kept tid[],
                                     OUT kept_ctids tid[], OUT kept_xmins xid[], OUT kept_inputs bytea[], OUT kept_keys jsonb[])
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(array_agg(u.c ORDER BY u.o), '{}'), coalesce(array_agg(u.x ORDER BY u.o), '{}'),
           coalesce(array_agg(u.s ORDER BY u.o), '{}'), coalesce(array_agg(u.k ORDER BY u.o), '{}')
    FROM ROWS FROM (pg_catalog.unnest(ctids), pg_catalog.unnest(xmins), pg_catalog.unnest(inputs), pg_catalog.unnest(keys))
         WITH ORDINALITY AS u(c, x, s, k, o)
    WHERE u.c OPERATOR(pg_catalog.=) ANY (kept)
$$;

CREATE PROCEDURE rsclip_backfill(tbl regclass, src name, dst name, batch_size int DEFAULT NULL, kind text DEFAULT 'image')
    LANGUAGE plpgsql
AS $proc$
DECLARE
    src_type regtype;
    dst_type regtype;
    src_expr text;
    key_expr text;
    claim_sql text;
    relock_sql text;
    update_sql text;
    batch int := batch_size;
    total bigint;
    remaining bigint;
    done bigint := 0;
    failed bigint := 0;
    done_at_pass_start bigint;
    nblocks bigint;
    span bigint;
    pos tid;
    pos_block bigint;
    cur_ctids tid[] := '{}';
    cur_src bytea[] := '{}';
    cur_keys jsonb[] := '{}';
    ahead_ctids tid[] := '{}';
    ahead_xmins xid[] := '{}';
    ahead_src bytea[] := '{}';
    ahead_keys jsonb[] := '{}';
    next_ctids tid[];
    next_xmins xid[];
    next_src bytea[];
    next_keys jsonb[];
    kept tid[];
    failed_rows tid[];
    res record;
    err_ctids tid[];
    err_keys jsonb[];
    err_msgs text[];
    sample bytea[];
    best_rate float8;
    row_bytes float8;
    max_batch int;
    rate float8;
    t0 timestamptz;
    started timestamptz := clock_timestamp();
    last_notice timestamptz := clock_timestamp();
    last_report timestamptz := clock_timestamp();
    i int;
    n int;
BEGIN
    IF kind IS NULL OR kind NOT IN ('image', 'text') THEN
        RAISE EXCEPTION 'rsclip_backfill: kind must be ''image'' or ''text'', not %', coalesce(quote_literal(kind), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF batch IS NOT NULL AND (batch < 1 OR batch > 4096) THEN
        RAISE EXCEPTION 'rsclip_backfill: batch_size must be between 1 and 4096, not %', batch
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT a.atttypid INTO src_type FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = src AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rsclip_backfill: column "%" of relation % does not exist', src, tbl USING ERRCODE = 'undefined_column';
    END IF;
    SELECT a.atttypid INTO dst_type FROM pg_catalog.pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = dst AND a.attnum > 0 AND NOT a.attisdropped;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rsclip_backfill: column "%" of relation % does not exist', dst, tbl USING ERRCODE = 'undefined_column';
    END IF;
    IF dst_type <> '@extschema@.embedding'::regtype THEN
        RAISE EXCEPTION 'rsclip_backfill: column "%" is %, not embedding', dst, dst_type USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF kind = 'image' AND src_type <> 'bytea'::regtype THEN
        RAISE EXCEPTION 'rsclip_backfill: image column "%" is %, not bytea (use kind => ''text'' for text)', src, src_type
            USING ERRCODE = 'datatype_mismatch';
    END IF;
    IF kind = 'text' AND src_type NOT IN ('text'::regtype, 'varchar'::regtype, 'bpchar'::regtype) THEN
        RAISE EXCEPTION 'rsclip_backfill: text column "%" is %, not text', src, src_type USING ERRCODE = 'datatype_mismatch';
    END IF;
    src_expr := CASE kind WHEN 'image' THEN format('%I', src)
                          ELSE format('pg_catalog.convert_to(%I::text, ''UTF8'')', src) END;
    -- the row identity logged with an error: the primary key's columns, when there is one
    SELECT 'pg_catalog.jsonb_build_object(' || string_agg(format('%L, %I', a.attname, a.attname), ', ' ORDER BY k.ord) || ')'
    INTO key_expr
    FROM pg_catalog.pg_index x
    CROSS JOIN LATERAL unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
    WHERE x.indrelid = tbl AND x.indisprimary;
    key_expr := coalesce(key_expr, 'NULL::jsonb');

    claim_sql := format(
        'SELECT coalesce(array_agg(c ORDER BY c), ''{}''), coalesce(array_agg(x ORDER BY c), ''{}''), '
        '       coalesce(array_agg(s ORDER BY c), ''{}''), coalesce(array_agg(k ORDER BY c), ''{}'') '
        'FROM (SELECT ctid AS c, xmin AS x, %s AS s, %s AS k FROM %s '
        '      WHERE ctid > $1 AND ctid < $2 AND %I IS NULL AND %I IS NOT NULL AND ctid <> ALL ($3) '
        '      ORDER BY ctid LIMIT $4 FOR UPDATE SKIP LOCKED) q',
        src_expr, key_expr, tbl, dst, src);
    -- Takes the locks again by (ctid, xmin): the procedure still holds the inputs (reading them
    -- again would fetch every image from TOAST twice), and a row that changed has a new ctid,
    -- while a slot emptied by VACUUM and refilled holds a row with another xmin.
    relock_sql := format(
        'SELECT coalesce(array_agg(c ORDER BY c), ''{}'') '
        'FROM (SELECT rsclip_t.ctid AS c FROM %s AS rsclip_t, '
        '             ROWS FROM (pg_catalog.unnest($1::tid[]), pg_catalog.unnest($2::xid[])) AS rsclip_w(c, x) '
        '      WHERE rsclip_t.ctid = rsclip_w.c AND rsclip_t.xmin OPERATOR(pg_catalog.=) rsclip_w.x '
        '        AND rsclip_t.%I IS NULL AND rsclip_t.%I IS NOT NULL FOR UPDATE OF rsclip_t SKIP LOCKED) q',
        tbl, dst, src);
    -- one statement per batch; the join on ctid is a TID scan per row
    update_sql := format('UPDATE %s AS rsclip_t SET %I = rsclip_u.e '
                         'FROM ROWS FROM (pg_catalog.unnest($1::tid[]), pg_catalog.unnest($2::@extschema@.embedding[])) '
                         'AS rsclip_u(c, e) WHERE rsclip_t.ctid = rsclip_u.c AND rsclip_u.e IS NOT NULL', tbl, dst);

    -- rows that failed before (until they change), as far as this role may see them
    SELECT coalesce(array_agg(DISTINCT e.row_ctid), '{}') INTO failed_rows
    FROM @extschema@.rsclip_backfill_errors e WHERE e.tbl = rsclip_backfill.tbl;
    EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL AND ctid <> ALL ($1)', tbl, dst, src)
        INTO total USING failed_rows;

    -- forget batches an interrupted run in this backend handed over
    PERFORM @extschema@.rsclip_backfill_encode('{}', kind, '{}');
    IF batch IS NULL THEN
        -- Probe: the batch size with the best rows/s on up to 32 of the rows to fill (after a
        -- warm-up that loads the model), doubling from 1 while throughput still improves by 5%.
        -- Memory bounds it: three batches' inputs (their stored size) and pixel tensors must fit
        -- in maintenance_work_mem, since the two batches after the one being written are decoded
        -- and encoded meanwhile (the model's activations grow with the batch too).
        EXECUTE format('SELECT avg(pg_catalog.pg_column_size(%I)) FROM (SELECT %I FROM %s WHERE %I IS NULL AND %I IS NOT NULL LIMIT 32) q',
                       src, src, tbl, dst, src) INTO row_bytes;
        row_bytes := coalesce(row_bytes, 0);
        IF kind = 'image' THEN
            row_bytes := row_bytes + 3 * 4 * ((@extschema@.rsclip_model_info()->>'image_size')::float8 ^ 2);
        END IF;
        max_batch := greatest(1, least(256, floor(pg_catalog.pg_size_bytes(current_setting('maintenance_work_mem'))
                                                  / greatest(3 * row_bytes, 1))))::int;
        EXECUTE format('SELECT array_agg(s) FROM (SELECT %s AS s FROM %s WHERE %I IS NULL AND %I IS NOT NULL LIMIT $1) q',
                       src_expr, tbl, dst, src) INTO sample USING least(32, max_batch);
        batch := least(8, max_batch);
        IF cardinality(sample) > 0 THEN
            PERFORM @extschema@.rsclip_backfill_encode(sample[1:1], kind, '{}');
            best_rate := 0;
            n := 1;
            WHILE n <= cardinality(sample) LOOP
                t0 := clock_timestamp();
                PERFORM @extschema@.rsclip_backfill_encode(sample[1:n], kind, '{}');
                rate := n / greatest(extract(epoch FROM clock_timestamp() - t0), 1e-6);
                EXIT WHEN rate < best_rate * 1.05;
                best_rate := rate;
                batch := n;
                n := n * 2;
            END LOOP;
            IF batch = cardinality(sample) THEN
                batch := least(batch * 2, max_batch);  -- still improving at the largest size tried
            END IF;
        END IF;
        RAISE NOTICE 'rsclip_backfill: batch size % (probed; at most % within maintenance_work_mem)', batch, max_batch;
    END IF;
    PERFORM @extschema@.rsclip_backfill_report(tbl, src, dst, kind, batch, total, 0, 0, false);
    COMMIT;

    <<passes>>
    LOOP
        done_at_pass_start := done;
        pos := '(0,0)';
        pos_block := 0;
        nblocks := pg_catalog.pg_relation_size(tbl) / current_setting('block_size')::bigint;
        -- blocks that hold about one batch of rows
        span := greatest(1, ceil(batch * greatest(nblocks, 1)::float8
                                 / greatest((SELECT reltuples FROM pg_catalog.pg_class WHERE oid = tbl), total, 1))::bigint);
        -- a pass starts with nothing handed over
        PERFORM @extschema@.rsclip_backfill_encode('{}', kind, '{}');
        LOOP
            -- claim the next batch after pos
            next_ctids := '{}';
            next_xmins := '{}';
            next_src := '{}';
            next_keys := '{}';
            WHILE pos_block <= nblocks LOOP
                EXECUTE claim_sql INTO next_ctids, next_xmins, next_src, next_keys
                    USING pos, format('(%s,0)', pos_block + span)::tid, failed_rows, batch;
                IF cardinality(next_ctids) > 0 THEN
                    pos := next_ctids[cardinality(next_ctids)];
                    pos_block := (pos::text::point)[0]::bigint;
                    EXIT;
                END IF;
                pos_block := pos_block + span;
                pos := format('(%s,0)', pos_block)::tid;
            END LOOP;

            -- Each batch is handed over as prefetch when claimed and encoded two iterations
            -- later, so that it decodes and runs through the model while earlier ones are written.
            IF cardinality(cur_ctids) > 0 THEN
                res := @extschema@.rsclip_backfill_encode(cur_src, kind, next_src);
                EXECUTE update_sql USING cur_ctids, res.embeddings;
                GET DIAGNOSTICS n = ROW_COUNT;
                done := done + n;
                err_ctids := '{}';
                err_keys := '{}';
                err_msgs := '{}';
                IF n < cardinality(cur_ctids) THEN
                    FOR i IN 1 .. cardinality(cur_ctids) LOOP
                        IF res.embeddings[i] IS NULL THEN
                            err_ctids := err_ctids || cur_ctids[i];
                            err_keys := err_keys || cur_keys[i];
                            err_msgs := err_msgs || coalesce(res.errors[i], 'no embedding');
                            failed := failed + 1;
                        END IF;
                    END LOOP;
                END IF;
                IF cardinality(err_ctids) > 0 THEN
                    INSERT INTO @extschema@.rsclip_backfill_error_log (tbl, row_ctid, row_key, message)
                    SELECT rsclip_backfill.tbl, u.c, u.k, u.m
                    FROM ROWS FROM (pg_catalog.unnest(err_ctids), pg_catalog.unnest(err_keys), pg_catalog.unnest(err_msgs)) AS u(c, k, m);
                    failed_rows := failed_rows || err_ctids;
                END IF;
                -- the progress row: once a second is plenty (a small model runs many batches a second)
                IF clock_timestamp() - last_report >= interval '1 second' THEN
                    last_report := clock_timestamp();
                    PERFORM @extschema@.rsclip_backfill_report(tbl, src, dst, kind, batch, total, done, failed, false);
                END IF;
                IF clock_timestamp() - last_notice >= interval '5 seconds' THEN
                    last_notice := clock_timestamp();
                    RAISE NOTICE 'rsclip_backfill: % of % rows done (% failed), % rows/s, ETA %',
                        done, total, failed,
                        round((done / greatest(extract(epoch FROM clock_timestamp() - started), 0.001))::numeric, 1),
                        CASE WHEN done > 0 THEN date_trunc('second', (clock_timestamp() - started)
                             * (greatest(total - done - failed, 0)::float8 / done)) END;
                END IF;
                COMMIT;
                -- the row locks of the batches ahead ended with the commit: take them again, and
                -- drop the rows another backfill took meanwhile
                IF cardinality(ahead_ctids) + cardinality(next_ctids) > 0 THEN
                    EXECUTE relock_sql INTO kept USING ahead_ctids || next_ctids, ahead_xmins || next_xmins;
                    IF cardinality(kept) < cardinality(ahead_ctids) + cardinality(next_ctids) THEN
                        SELECT * INTO ahead_ctids, ahead_xmins, ahead_src, ahead_keys
                        FROM @extschema@.rsclip_backfill_keep(ahead_ctids, ahead_xmins, ahead_src, ahead_keys, kept);
                        SELECT * INTO next_ctids, next_xmins, next_src, next_keys
                        FROM @extschema@.rsclip_backfill_keep(next_ctids, next_xmins, next_src, next_keys, kept);
                    END IF;
                END IF;
            ELSIF cardinality(next_ctids) > 0 THEN
                -- the first batches of a pass: only hand them over
                PERFORM @extschema@.rsclip_backfill_encode('{}', kind, next_src);
            END IF;
            cur_ctids := ahead_ctids;
            cur_src := ahead_src;
            cur_keys := ahead_keys;
            ahead_ctids := next_ctids;
            ahead_xmins := next_xmins;
            ahead_src := next_src;
            ahead_keys := next_keys;
            EXIT WHEN cardinality(cur_ctids) = 0 AND cardinality(ahead_ctids) = 0 AND pos_block > nblocks;
        END LOOP;
        -- Rows another transaction held during this pass are still NULL: go again while passes
        -- make progress.
        EXECUTE format('SELECT count(*) FROM %s WHERE %I IS NULL AND %I IS NOT NULL AND ctid <> ALL ($1)', tbl, dst, src)
            INTO remaining USING failed_rows;
        EXIT passes WHEN remaining = 0;
        IF done = done_at_pass_start THEN
            RAISE NOTICE 'rsclip_backfill: % rows are held by other transactions; run rsclip_backfill again later', remaining;
            EXIT passes;
        END IF;
    END LOOP;
    PERFORM @extschema@.rsclip_backfill_report(tbl, src, dst, kind, batch, total, done, failed, true);
    COMMIT;
    RAISE NOTICE 'rsclip_backfill: % rows embedded, % failed (see rsclip_backfill_errors) in %',
        done, failed, date_trunc('millisecond', clock_timestamp() - started);
END
$proc$;
COMMENT ON PROCEDURE rsclip_backfill(regclass, name, name, int, text) IS
    'fills dst from src (kind image: bytea; text: text) where dst IS NULL, in committed batches; resumable and shareable between backends';
