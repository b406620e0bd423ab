-- Casts between pgvector's vector and embedding, without a hard dependency on pgvector: the
-- functions and casts are created only when a type named vector exists, either now (at CREATE
-- EXTENSION rsclip) or later by calling rsclip_create_vector_casts() after CREATE EXTENSION vector.

CREATE FUNCTION rsclip_create_vector_casts() RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    vector_type regtype;
    our_schema text := (SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                        WHERE t.oid = '@extschema@.embedding'::regtype);
    lib text;
BEGIN
    SELECT t.oid::regtype INTO vector_type FROM pg_type t JOIN pg_extension e ON e.extname = 'vector'
      JOIN pg_depend d ON d.objid = t.oid AND d.refobjid = e.oid AND d.deptype = 'e'
     WHERE t.typname = 'vector' AND t.typtype = 'b';
    IF vector_type IS NULL THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_cast WHERE castsource = vector_type
               AND casttarget = '@extschema@.embedding'::regtype) THEN
        RETURN true;
    END IF;
    SELECT probin INTO lib FROM pg_proc WHERE oid = '@extschema@.embedding_in(cstring, oid, integer)'::regprocedure;
    EXECUTE format('CREATE FUNCTION %I.embedding_from_vector(%s, integer, boolean) RETURNS %I.embedding
        AS %L, %L LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE',
        our_schema, vector_type, our_schema, lib, 'embedding_from_vector');
    EXECUTE format('CREATE FUNCTION %I.embedding_to_vector(%I.embedding) RETURNS %s
        AS %L, %L LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE',
        our_schema, our_schema, vector_type, lib, 'embedding_to_vector');
    EXECUTE format('CREATE CAST (%s AS %I.embedding) WITH FUNCTION %I.embedding_from_vector(%s, integer, boolean) AS ASSIGNMENT',
        vector_type, our_schema, our_schema, vector_type);
    EXECUTE format('CREATE CAST (%I.embedding AS %s) WITH FUNCTION %I.embedding_to_vector(%I.embedding) AS ASSIGNMENT',
        our_schema, vector_type, our_schema, our_schema);
    -- Outside the install script the new objects must be attached explicitly so that
    -- DROP EXTENSION rsclip removes them.
    IF NOT EXISTS (SELECT 1 FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
                   WHERE e.extname = 'rsclip' AND d.deptype = 'e'
                     AND d.objid = (our_schema || '.embedding_to_vector(' || our_schema || '.embedding)')::regprocedure) THEN
        BEGIN
            EXECUTE format('ALTER EXTENSION rsclip ADD FUNCTION %I.embedding_from_vector(%s, integer, boolean)', our_schema, vector_type);
            EXECUTE format('ALTER EXTENSION rsclip ADD FUNCTION %I.embedding_to_vector(%I.embedding)', our_schema, our_schema);
            EXECUTE format('ALTER EXTENSION rsclip ADD CAST (%s AS %I.embedding)', vector_type, our_schema);
            EXECUTE format('ALTER EXTENSION rsclip ADD CAST (%I.embedding AS %s)', our_schema, vector_type);
        EXCEPTION WHEN object_not_in_prerequisite_state OR feature_not_supported THEN
            NULL; -- already members: we are inside CREATE EXTENSION rsclip
        END;
    END IF;
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION rsclip_create_vector_casts() IS
    'creates casts between pgvector''s vector and embedding; returns false when pgvector is not installed';

SELECT rsclip_create_vector_casts();
