-- The rsclip index access method: IVF lists of RaBitQ codes, re-ranked with the exact distance
-- read from the table row. Serves ORDER BY <#> / <=> / <-> ... LIMIT k.

CREATE FUNCTION rsclip_amhandler(internal) RETURNS index_am_handler
    AS 'MODULE_PATHNAME', 'rsclip_amhandler' LANGUAGE C;
CREATE ACCESS METHOD rsclip TYPE INDEX HANDLER rsclip_amhandler;
COMMENT ON ACCESS METHOD rsclip IS 'approximate nearest-neighbour search over embedding (IVF + RaBitQ, exact re-ranking)';

-- Support function 1 of each operator class names its metric (1 inner product, 2 cosine, 3 L2),
-- so the index never has to guess it from operator names or OIDs.
CREATE FUNCTION rsclip_metric_ip(internal) RETURNS integer
    AS 'MODULE_PATHNAME', 'rsclip_metric_ip' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION rsclip_metric_cosine(internal) RETURNS integer
    AS 'MODULE_PATHNAME', 'rsclip_metric_cosine' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION rsclip_metric_l2(internal) RETURNS integer
    AS 'MODULE_PATHNAME', 'rsclip_metric_l2' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

CREATE OPERATOR CLASS embedding_ip_ops FOR TYPE embedding USING rsclip AS
    OPERATOR 1 <#> (embedding, embedding) FOR ORDER BY float_ops,
    OPERATOR 2 <#^ (embedding, embedding) FOR ORDER BY float_ops,
    FUNCTION 1 rsclip_metric_ip(internal);
CREATE OPERATOR CLASS embedding_cosine_ops FOR TYPE embedding USING rsclip AS
    OPERATOR 1 <=> (embedding, embedding) FOR ORDER BY float_ops,
    FUNCTION 1 rsclip_metric_cosine(internal);
CREATE OPERATOR CLASS embedding_l2_ops FOR TYPE embedding USING rsclip AS
    OPERATOR 1 <-> (embedding, embedding) FOR ORDER BY float_ops,
    FUNCTION 1 rsclip_metric_l2(internal);

-- Structure check in the spirit of amcheck: every page and chain parses, and every live row of
-- the table is reachable from the index. Returns a summary; raises XX002 on corruption.
CREATE FUNCTION rsclip_index_check(index regclass) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rsclip_index_check' LANGUAGE C VOLATILE STRICT PARALLEL RESTRICTED;
