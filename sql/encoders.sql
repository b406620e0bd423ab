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

CREATE FUNCTION rsclip_inference_stats() RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rsclip_inference_stats' LANGUAGE C VOLATILE PARALLEL SAFE;
COMMENT ON FUNCTION rsclip_inference_stats() IS
    'per shared inference worker (rsclip.inference = worker): requests, batches, mean and max batch rows, queue wait p50/p99, model time, errors';

CREATE VIEW rsclip_inference_stats AS
    SELECT * FROM jsonb_to_recordset(@extschema@.rsclip_inference_stats()) AS w(
        worker int, running bool, device text, starts int, requests bigint, batches bigint,
        rows bigint, mean_batch_rows float8, max_batch_rows bigint, errors bigint,
        model_ms float8, model_loads bigint, queue_wait_p50_us bigint, queue_wait_p99_us bigint);
