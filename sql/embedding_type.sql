-- The embedding type: a varlena of float4 with its dimension count (1..16000).
-- STORAGE = main keeps values up to ~2000 dimensions inline in the heap tuple (compression is
-- only tried for rows over 2 KB and rarely pays off for float data; out-of-line storage only when
-- a row would not fit a page), so sequential scans read vectors in place.

CREATE TYPE embedding;

CREATE FUNCTION embedding_in(cstring, oid, integer) RETURNS embedding
    AS 'MODULE_PATHNAME', 'embedding_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_out(embedding) RETURNS cstring
    AS 'MODULE_PATHNAME', 'embedding_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_typmod_in(cstring[]) RETURNS integer
    AS 'MODULE_PATHNAME', 'embedding_typmod_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_typmod_out(integer) RETURNS cstring
    AS 'MODULE_PATHNAME', 'embedding_typmod_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_recv(internal, oid, integer) RETURNS embedding
    AS 'MODULE_PATHNAME', 'embedding_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_send(embedding) RETURNS bytea
    AS 'MODULE_PATHNAME', 'embedding_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE TYPE embedding (
    INPUT = embedding_in,
    OUTPUT = embedding_out,
    TYPMOD_IN = embedding_typmod_in,
    TYPMOD_OUT = embedding_typmod_out,
    RECEIVE = embedding_recv,
    SEND = embedding_send,
    INTERNALLENGTH = VARIABLE,
    ALIGNMENT = int4,
    STORAGE = main
);

COMMENT ON TYPE embedding IS 'float4 vector of 1..16000 dimensions, text format [1,2,3] as pgvector';

-- Enforces embedding(n) when an existing value is stored or cast.
CREATE FUNCTION embedding(embedding, integer, boolean) RETURNS embedding
    AS 'MODULE_PATHNAME', 'embedding_enforce_typmod' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE CAST (embedding AS embedding) WITH FUNCTION embedding(embedding, integer, boolean) AS IMPLICIT;
