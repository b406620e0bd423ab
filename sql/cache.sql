-- The shared result cache: what any backend encoded, every backend can reuse.
--
-- Keyed by the model fingerprint (a digest of the model files' checksums and, for images, of the
-- settings that change decoding), the kind of input and the sha256 of the input (text after the
-- tokenizer's normalization; image bytes as stored). Only the extension's own functions write it:
-- ordinary roles have no privileges on the table, and the encoders switch to the table owner
-- for their lookups and inserts only. The table is an extension member without
-- pg_extension_config_dump, so pg_dump leaves its rows out: it is a cache, rebuilt on demand.

CREATE TABLE rsclip_cache (
    model bytea NOT NULL CHECK (length(model) = 32),
    kind text NOT NULL CHECK (kind IN ('text', 'image')),
    input_sha256 bytea NOT NULL CHECK (length(input_sha256) = 32),
    embedding embedding NOT NULL,
    created timestamptz NOT NULL DEFAULT now(),
    last_used timestamptz NOT NULL DEFAULT now(),
    hits bigint NOT NULL DEFAULT 0,
    CONSTRAINT rsclip_cache_pkey PRIMARY KEY (model, kind, input_sha256)
);
-- Embeddings of 768 floats exceed the 2 KB TOAST threshold: keep them inline (no TOAST fetch on
-- a hit). Hit counters change often: leave room for HOT updates.
ALTER TABLE rsclip_cache ALTER COLUMN embedding SET STORAGE main;
ALTER TABLE rsclip_cache SET (fillfactor = 90);
REVOKE ALL ON rsclip_cache FROM PUBLIC;
COMMENT ON TABLE rsclip_cache IS
    'rsclip encoder results shared by all backends (filled by rsclip_encode_*; see rsclip.cache)';

-- Harmless for PUBLIC by construction: it returns the calling backend's own counters and reads
-- no table (rsclip_cache_stats wraps it).
CREATE FUNCTION rsclip_cache_backend_stats() RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rsclip_cache_backend_stats' LANGUAGE C VOLATILE PARALLEL RESTRICTED;
COMMENT ON FUNCTION rsclip_cache_backend_stats() IS
    'this backend''s cache counters (used by rsclip_cache_stats)';

-- SECURITY DEFINER so that roles without access to the table can see its size; the function
-- only returns counts.
CREATE FUNCTION rsclip_cache_stats(
    OUT lru_hits bigint, OUT table_hits bigint, OUT misses bigint, OUT lru_entries bigint,
    OUT writes_skipped bigint, OUT table_rows bigint, OUT table_bytes bigint)
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (s->>'lru_hits')::bigint, (s->>'table_hits')::bigint, (s->>'misses')::bigint,
           (s->>'lru_entries')::bigint, (s->>'writes_skipped')::bigint,
           (SELECT count(*) FROM @extschema@.rsclip_cache),
           pg_total_relation_size('@extschema@.rsclip_cache'::regclass)
    FROM @extschema@.rsclip_cache_backend_stats() s
$$;
COMMENT ON FUNCTION rsclip_cache_stats() IS
    'hits (per-backend LRU and shared table) and misses of this backend, and the cache table''s rows and bytes';

-- Removes entries unused for longer than older_than, then all but the max_rows most recently
-- used. Runs with the caller's rights: the table owner (or whoever it grants DELETE) may prune.
CREATE FUNCTION rsclip_cache_prune(older_than interval DEFAULT NULL, max_rows bigint DEFAULT NULL)
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
REVOKE EXECUTE ON FUNCTION rsclip_cache_prune(interval, bigint) FROM PUBLIC;
COMMENT ON FUNCTION rsclip_cache_prune(interval, bigint) IS
    'deletes cache entries unused for longer than older_than, then all but the max_rows most recently used; returns the number deleted';
