-- Encoders: images and texts to unit-length embeddings with the model in rsclip.model_path.
-- STABLE, not IMMUTABLE: results depend on the configured model. PARALLEL SAFE: each worker
-- loads its own sessions. NULL in, NULL out (STRICT; NULL array elements stay NULL).

CREATE FUNCTION rsclip_encode_image(bytea) RETURNS embedding
    AS 'MODULE_PATHNAME', 'rsclip_encode_image' LANGUAGE C STABLE STRICT PARALLEL SAFE COST 10000;
CREATE FUNCTION rsclip_encode_text(text) RETURNS embedding
    AS 'MODULE_PATHNAME', 'rsclip_encode_text' LANGUAGE C STABLE STRICT PARALLEL SAFE COST 5000;
CREATE FUNCTION rsclip_encode_images(bytea[]) RETURNS embedding[]
    AS 'MODULE_PATHNAME', 'rsclip_encode_images' LANGUAGE C STABLE STRICT PARALLEL SAFE COST 100000;
CREATE FUNCTION rsclip_encode_texts(text[]) RETURNS embedding[]
    AS 'MODULE_PATHNAME', 'rsclip_encode_texts' LANGUAGE C STABLE STRICT PARALLEL SAFE COST 50000;
CREATE FUNCTION rsclip_probability(image_embedding embedding, text_embedding embedding) RETURNS double precision
    AS 'MODULE_PATHNAME', 'rsclip_probability' LANGUAGE C STABLE STRICT PARALLEL SAFE;
COMMENT ON FUNCTION rsclip_probability(embedding, embedding) IS
    'SigLIP match probability sigmoid(cos * exp(logit_scale) + logit_bias) with the model''s scale and bias';
CREATE FUNCTION rsclip_model_info() RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rsclip_model_info' LANGUAGE C VOLATILE PARALLEL SAFE;
