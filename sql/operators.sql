-- Distances follow pgvector's conventions: <#> negative inner product, <=> cosine distance,
-- <-> Euclidean distance. All are IMMUTABLE and PARALLEL SAFE, and all but <#^ STRICT.

CREATE FUNCTION embedding_negative_inner_product(embedding, embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'embedding_negative_inner_product' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_cosine_distance(embedding, embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'embedding_cosine_distance' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_l2_distance(embedding, embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'embedding_l2_distance' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION rsclip_score(embedding, embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'rsclip_score' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION rsclip_score(embedding, embedding) IS 'inner product; cosine similarity for unit vectors';

CREATE OPERATOR <#> (LEFTARG = embedding, RIGHTARG = embedding,
    FUNCTION = embedding_negative_inner_product, COMMUTATOR = '<#>');
-- <#> with NULLs first (-Infinity): its ascending order is rsclip_score DESC's (NULLS FIRST),
-- which the planner hook rewrites into it on nullable columns so that an rsclip index serves
-- ORDER BY rsclip_score(emb, q) DESC. Not STRICT.
CREATE FUNCTION embedding_negative_inner_product_nulls_first(embedding, embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'embedding_negative_inner_product_nulls_first' LANGUAGE C IMMUTABLE PARALLEL SAFE;
CREATE OPERATOR <#^ (LEFTARG = embedding, RIGHTARG = embedding,
    FUNCTION = embedding_negative_inner_product_nulls_first, COMMUTATOR = '<#^');
CREATE OPERATOR <=> (LEFTARG = embedding, RIGHTARG = embedding,
    FUNCTION = embedding_cosine_distance, COMMUTATOR = '<=>');
CREATE OPERATOR <-> (LEFTARG = embedding, RIGHTARG = embedding,
    FUNCTION = embedding_l2_distance, COMMUTATOR = '<->');

CREATE FUNCTION embedding_dims(embedding) RETURNS integer
    AS 'MODULE_PATHNAME', 'embedding_dims' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_norm(embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'embedding_norm' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION rsclip_normalize(embedding) RETURNS embedding
    AS 'MODULE_PATHNAME', 'rsclip_normalize' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Equality and ordering, so =, DISTINCT, GROUP BY, ORDER BY emb and unique indexes work.
CREATE FUNCTION embedding_eq(embedding, embedding) RETURNS boolean
    AS 'MODULE_PATHNAME', 'embedding_eq' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_ne(embedding, embedding) RETURNS boolean
    AS 'MODULE_PATHNAME', 'embedding_ne' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_lt(embedding, embedding) RETURNS boolean
    AS 'MODULE_PATHNAME', 'embedding_lt' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_le(embedding, embedding) RETURNS boolean
    AS 'MODULE_PATHNAME', 'embedding_le' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_gt(embedding, embedding) RETURNS boolean
    AS 'MODULE_PATHNAME', 'embedding_gt' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_ge(embedding, embedding) RETURNS boolean
    AS 'MODULE_PATHNAME', 'embedding_ge' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_cmp(embedding, embedding) RETURNS integer
    AS 'MODULE_PATHNAME', 'embedding_cmp' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION embedding_hash(embedding) RETURNS integer
    AS 'MODULE_PATHNAME', 'embedding_hash' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE OPERATOR = (LEFTARG = embedding, RIGHTARG = embedding, PROCEDURE = embedding_eq,
    COMMUTATOR = '=', NEGATOR = '<>', RESTRICT = eqsel, JOIN = eqjoinsel, HASHES, MERGES);
CREATE OPERATOR <> (LEFTARG = embedding, RIGHTARG = embedding, PROCEDURE = embedding_ne,
    COMMUTATOR = '<>', NEGATOR = '=', RESTRICT = neqsel, JOIN = neqjoinsel);
CREATE OPERATOR < (LEFTARG = embedding, RIGHTARG = embedding, PROCEDURE = embedding_lt,
    COMMUTATOR = '>', NEGATOR = '>=', RESTRICT = scalarltsel, JOIN = scalarltjoinsel);
CREATE OPERATOR <= (LEFTARG = embedding, RIGHTARG = embedding, PROCEDURE = embedding_le,
    COMMUTATOR = '>=', NEGATOR = '>', RESTRICT = scalarlesel, JOIN = scalarlejoinsel);
CREATE OPERATOR > (LEFTARG = embedding, RIGHTARG = embedding, PROCEDURE = embedding_gt,
    COMMUTATOR = '<', NEGATOR = '<=', RESTRICT = scalargtsel, JOIN = scalargtjoinsel);
CREATE OPERATOR >= (LEFTARG = embedding, RIGHTARG = embedding, PROCEDURE = embedding_ge,
    COMMUTATOR = '<=', NEGATOR = '<', RESTRICT = scalargesel, JOIN = scalargejoinsel);

CREATE OPERATOR CLASS embedding_ops DEFAULT FOR TYPE embedding USING btree AS
    OPERATOR 1 <, OPERATOR 2 <=, OPERATOR 3 =, OPERATOR 4 >=, OPERATOR 5 >,
    FUNCTION 1 embedding_cmp(embedding, embedding);

CREATE OPERATOR CLASS embedding_hash_ops DEFAULT FOR TYPE embedding USING hash AS
    OPERATOR 1 =,
    FUNCTION 1 embedding_hash(embedding);
