-- Casts between embedding and arrays. Array to embedding is allowed in assignment (INSERT an
-- array into an embedding column); embedding to real[] likewise.

CREATE FUNCTION array_to_embedding(real[], integer, boolean) RETURNS embedding
    AS 'MODULE_PATHNAME', 'array_to_embedding' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION array_to_embedding(double precision[], integer, boolean) RETURNS embedding
    AS 'MODULE_PATHNAME', 'array_to_embedding' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION array_to_embedding(integer[], integer, boolean) RETURNS embedding
    AS 'MODULE_PATHNAME', 'array_to_embedding' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION array_to_embedding(numeric[], integer, boolean) RETURNS embedding
    AS 'MODULE_PATHNAME', 'array_to_embedding' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_to_real_array(embedding, integer, boolean) RETURNS real[]
    AS 'MODULE_PATHNAME', 'embedding_to_real_array' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE CAST (real[] AS embedding) WITH FUNCTION array_to_embedding(real[], integer, boolean) AS ASSIGNMENT;
CREATE CAST (double precision[] AS embedding) WITH FUNCTION array_to_embedding(double precision[], integer, boolean) AS ASSIGNMENT;
CREATE CAST (integer[] AS embedding) WITH FUNCTION array_to_embedding(integer[], integer, boolean) AS ASSIGNMENT;
CREATE CAST (numeric[] AS embedding) WITH FUNCTION array_to_embedding(numeric[], integer, boolean) AS ASSIGNMENT;
CREATE CAST (embedding AS real[]) WITH FUNCTION embedding_to_real_array(embedding, integer, boolean) AS ASSIGNMENT;
