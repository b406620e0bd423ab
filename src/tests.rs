//! In-transaction SQL behaviour (`cargo pgrx test`). What a single transaction cannot show
//! (COPY BINARY across sessions, dump/restore, agreement with pgvector) is in tests/integration.

use pgrx::prelude::*;

/// Runs `sql` in a subtransaction and returns "ok" or "SQLSTATE: message".
fn outcome(sql: &str) -> String {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.outcome(q text) RETURNS text LANGUAGE plpgsql AS $$
         DECLARE detail text;
         BEGIN EXECUTE q; RETURN 'ok';
         EXCEPTION WHEN OTHERS THEN
             GET STACKED DIAGNOSTICS detail = PG_EXCEPTION_DETAIL;
             RETURN SQLSTATE || ': ' || SQLERRM || coalesce(' DETAIL: ' || nullif(detail, ''), ''); END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.outcome($1)", &[sql.into()])
        .unwrap()
        .unwrap()
}

fn text(sql: &str) -> String {
    Spi::get_one::<String>(sql).unwrap().unwrap()
}

/// The whole EXPLAIN (COSTS OFF) output of `sql`, one line per plan row.
fn plan(sql: &str) -> String {
    Spi::run(
        "CREATE OR REPLACE FUNCTION pg_temp.plan(q text) RETURNS text LANGUAGE plpgsql AS $$
         DECLARE r record; result text := '';
         BEGIN FOR r IN EXECUTE 'EXPLAIN (COSTS OFF) ' || q LOOP
             result := result || r.\"QUERY PLAN\" || E'\\n'; END LOOP; RETURN result; END $$",
    )
    .unwrap();
    Spi::get_one_with_args::<String>("SELECT pg_temp.plan($1)", &[sql.into()])
        .unwrap()
        .unwrap()
}

fn float(sql: &str) -> f64 {
    Spi::get_one::<f64>(sql).unwrap().unwrap()
}

fn assert_error(sql: &str, sqlstate: &str, needle: &str) {
    let got = outcome(sql);
    assert!(
        got.starts_with(sqlstate),
        "{sql}: expected SQLSTATE {sqlstate}, got {got}"
    );
    assert!(
        got.contains(needle),
        "{sql}: expected message containing {needle:?}, got {got}"
    );
}

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn text_round_trip_and_format() {
        assert_eq!(
            text("SELECT '[1,2.5,-3e-2]'::embedding::text"),
            "[1,2.5,-0.03]"
        );
        assert_eq!(
            text("SELECT E' \\t[ 1 ,2\\n, 3 ] '::embedding::text"),
            "[1,2,3]"
        );
        assert_eq!(
            text("SELECT '[0.00001,1e6,-0,3.4028235e38]'::embedding::text"),
            "[1e-05,1e+06,-0,3.4028235e+38]"
        );
        assert_eq!(text("SELECT '[0.1]'::embedding::text"), "[0.1]");
        // Output matches float4's own spelling, element by element.
        let same: bool = Spi::get_one(
            "SELECT bool_and(format('[%s]', x::float4::text)::embedding::text = format('[%s]', x::float4::text))
               FROM (SELECT (random() - 0.5) * 10 ^ (random() * 60 - 30) AS x FROM generate_series(1, 20000)) s",
        )
        .unwrap()
        .unwrap();
        assert!(same);
    }

    #[pg_test]
    fn bad_text_input_is_22p02_with_the_text() {
        for bad in [
            "[1,2", "[]", "[1,,2]", "[a]", "[1e999]", "[NaN]", "1,2]", "", "[1,2]x", "[inf]",
        ] {
            assert_error(
                &format!("SELECT '{bad}'::embedding"),
                "22P02",
                &format!("\"{bad}\""),
            );
        }
        let too_many = format!("[{}]", vec!["1"; 16001].join(","));
        assert_error(
            &format!("SELECT '{too_many}'::embedding"),
            "22P02",
            "more than 16000 dimensions",
        );
        let max = format!("[{}]", vec!["1"; 16000].join(","));
        assert_eq!(
            Spi::get_one::<i32>(&format!("SELECT embedding_dims('{max}')")).unwrap(),
            Some(16000)
        );
    }

    #[pg_test]
    fn typmod_is_enforced_everywhere() {
        Spi::run("CREATE TABLE t (id int, e embedding(3))").unwrap();
        assert_eq!(text("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'e'"), "embedding(3)");
        Spi::run("INSERT INTO t VALUES (1, '[1,2,3]')").unwrap();
        assert_error(
            "INSERT INTO t VALUES (2, '[1,2]')",
            "22000",
            "expected 3 dimensions, not 2",
        );
        assert_error(
            "UPDATE t SET e = '[1,2,3,4]'::embedding",
            "22000",
            "expected 3 dimensions, not 4",
        );
        assert_error(
            "INSERT INTO t VALUES (3, ARRAY[1,2]::real[])",
            "22000",
            "expected 3 dimensions, not 2",
        );
        assert_error(
            "SELECT '[1,2]'::embedding::embedding(3)",
            "22000",
            "expected 3 dimensions, not 2",
        );
        assert_error(
            "SELECT '[1,2]'::embedding(3)",
            "22000",
            "expected 3 dimensions, not 2",
        );
        assert_error("CREATE TABLE bad (e embedding(0))", "22023", "at least 1");
        assert_error(
            "CREATE TABLE bad (e embedding(16001))",
            "22023",
            "cannot exceed 16000",
        );
        assert_error(
            "CREATE TABLE bad (e embedding(2, 3))",
            "22023",
            "invalid type modifier",
        );
        assert_eq!(text("SELECT e::text FROM t"), "[1,2,3]");
    }

    #[pg_test]
    fn casts_from_and_to_arrays() {
        assert_eq!(
            text("SELECT ARRAY[1.5, 2]::real[]::embedding::text"),
            "[1.5,2]"
        );
        assert_eq!(
            text("SELECT ARRAY[1.5, 2]::float8[]::embedding::text"),
            "[1.5,2]"
        );
        assert_eq!(
            text("SELECT ARRAY[1, -2]::int[]::embedding::text"),
            "[1,-2]"
        );
        assert_eq!(
            text("SELECT ARRAY[1.25, 2]::numeric[]::embedding::text"),
            "[1.25,2]"
        );
        assert_eq!(text("SELECT '[1,2.5]'::embedding::real[]::text"), "{1,2.5}");
        assert_error(
            "SELECT ARRAY[1, NULL]::real[]::embedding",
            "22004",
            "element 2 is NULL",
        );
        assert_error(
            "SELECT ARRAY[]::real[]::embedding",
            "22000",
            "at least 1 dimension",
        );
        assert_error(
            "SELECT ARRAY[[1,2],[3,4]]::real[]::embedding",
            "22000",
            "one-dimensional",
        );
        assert_error(
            "SELECT ARRAY[1e300]::float8[]::embedding",
            "22003",
            "element 1",
        );
        assert_error(
            "SELECT ARRAY['NaN']::float8[]::embedding",
            "22003",
            "element 1",
        );
        assert_error(
            "SELECT ARRAY['Infinity']::real[]::embedding",
            "22003",
            "element 1",
        );
        assert_error("SELECT ARRAY[1e300]::numeric[]::embedding", "22003", "");
    }

    #[pg_test]
    fn distances_and_functions() {
        assert_eq!(float("SELECT '[3,4]'::embedding <#> '[1,0]'"), -3.0);
        assert_eq!(float("SELECT rsclip_score('[3,4]', '[1,2]')"), 11.0);
        assert_eq!(float("SELECT '[3,4]'::embedding <-> '[0,0]'"), 5.0);
        assert!((float("SELECT '[1,0]'::embedding <=> '[0,1]'") - 1.0).abs() < 1e-12);
        assert!((float("SELECT '[1,1]'::embedding <=> '[-2,-2]'") - 2.0).abs() < 1e-12);
        assert!(float("SELECT '[0,0]'::embedding <=> '[1,1]'").is_nan());
        assert_eq!(
            Spi::get_one::<i32>("SELECT embedding_dims('[1,2,3]')").unwrap(),
            Some(3)
        );
        assert_eq!(float("SELECT embedding_norm('[3,4]')"), 5.0);
        assert_eq!(text("SELECT rsclip_normalize('[3,4]')::text"), "[0.6,0.8]");
        assert_eq!(text("SELECT rsclip_normalize('[0,0]')::text"), "[0,0]");
        assert!(
            (float("SELECT embedding_norm(rsclip_normalize('[1,2,3,4,5,6,7,8,9]'))") - 1.0).abs()
                < 1e-6
        );
        for op in ["<#>", "<=>", "<->"] {
            assert_error(
                &format!("SELECT '[1,2]'::embedding {op} '[1,2,3]'"),
                "22000",
                "different embedding dimensions 2 and 3",
            );
        }
        assert_error(
            "SELECT rsclip_score('[1,2]', '[1]')",
            "22000",
            "different embedding dimensions",
        );
        // NULL in, NULL out.
        assert_eq!(
            Spi::get_one::<f64>("SELECT NULL::embedding <#> '[1]'").unwrap(),
            None
        );
    }

    #[pg_test]
    fn equality_btree_and_hash() {
        Spi::run("CREATE TABLE e (v embedding)").unwrap();
        Spi::run("INSERT INTO e VALUES ('[1,2]'), ('[1,2]'), ('[1,2,0]'), ('[0,5]'), ('[-0,5]'), ('[1,3]')").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(DISTINCT v) FROM e").unwrap(),
            Some(4)
        );
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM (SELECT v FROM e GROUP BY v) g").unwrap(),
            Some(4)
        );
        Spi::run("SET enable_sort = off").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM (SELECT v FROM e GROUP BY v) g").unwrap(),
            Some(4)
        );
        Spi::run("RESET enable_sort").unwrap();
        // -0 and 0 are equal, so they sort together; compare after folding the sign of zero.
        assert_eq!(
            text("SELECT string_agg(replace(v::text, '-0', '0'), ' ' ORDER BY v) FROM e"),
            "[0,5] [0,5] [1,2] [1,2] [1,2,0] [1,3]"
        );
        assert!(Spi::get_one::<bool>("SELECT '[0,5]'::embedding = '[-0,5]'")
            .unwrap()
            .unwrap());
        assert!(
            Spi::get_one::<bool>("SELECT '[1,2]'::embedding < '[1,2,0]'")
                .unwrap()
                .unwrap()
        );
        assert!(Spi::get_one::<bool>("SELECT '[1,2]'::embedding <> '[1,3]'")
            .unwrap()
            .unwrap());
        Spi::run("CREATE TABLE u (v embedding UNIQUE)").unwrap();
        Spi::run("INSERT INTO u VALUES ('[1,2]')").unwrap();
        assert_error("INSERT INTO u VALUES ('[1,2]')", "23505", "duplicate key");
        Spi::run("CREATE INDEX ON e USING hash (v)").unwrap();
        Spi::run("SET enable_seqscan = off").unwrap();
        assert_eq!(
            Spi::get_one::<i64>("SELECT count(*) FROM e WHERE v = '[-0,5]'").unwrap(),
            Some(2)
        );
    }

    #[pg_test]
    fn binary_send_matches_pgvector_layout() {
        assert_eq!(
            text("SELECT embedding_send('[1,-2]')::text"),
            "\\x000200003f800000c0000000"
        );
    }

    /// Values of CLIP-sized embeddings stay inline (no TOAST), so scans read them in place.
    #[pg_test]
    fn clip_sized_values_are_stored_inline() {
        assert_eq!(
            text("SELECT typstorage::text FROM pg_type WHERE typname = 'embedding'"),
            "m"
        );
        Spi::run("CREATE TABLE tiles (id int, emb embedding(1024))").unwrap();
        Spi::run("INSERT INTO tiles SELECT i, (SELECT array_agg(random())::real[] FROM generate_series(1, 1024) WHERE i > 0) FROM generate_series(1, 200) i").unwrap();
        let toast_bytes = Spi::get_one::<i64>(
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'tiles'",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            toast_bytes, 0,
            "1024-dim embeddings must not be moved to TOAST"
        );
    }

    /// A TOASTed query vector is fetched once per scan, not once per row.
    #[pg_test]
    fn toasted_query_is_detoasted_once_per_scan() {
        Spi::run("CREATE TABLE q (v embedding)").unwrap();
        Spi::run("ALTER TABLE q ALTER v SET STORAGE external").unwrap();
        Spi::run("INSERT INTO q SELECT (SELECT array_agg(random())::real[] FROM generate_series(1, 768))").unwrap();
        Spi::run("CREATE TABLE rows (id int, emb embedding(768))").unwrap();
        Spi::run("INSERT INTO rows SELECT i, (SELECT array_agg(random())::real[] FROM generate_series(1, 768) WHERE i > 0) FROM generate_series(1, 3000) i").unwrap();
        let toast = text("SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'q'");
        assert!(
            Spi::get_one::<i64>(&format!("SELECT count(*) FROM {toast}"))
                .unwrap()
                .unwrap()
                >= 2,
            "the query vector must really be out of line"
        );
        let fetched = || {
            Spi::get_one::<i64>(&format!(
                "SELECT pg_stat_get_xact_blocks_fetched('{toast}'::regclass)"
            ))
            .unwrap()
            .unwrap()
        };
        let before = fetched();
        let ids = text("SELECT string_agg(id::text, ',') FROM (SELECT id FROM rows ORDER BY emb <#> (SELECT v FROM q) LIMIT 5) s");
        let after = fetched();
        assert_eq!(ids.split(',').count(), 5);
        assert!(
            after - before < 50,
            "query vector TOAST blocks fetched {} times for 3000 rows",
            after - before
        );
        // The cached copy gives the same answer as a fresh detoast per row would.
        let direct = text("SELECT string_agg(id::text, ',') FROM (SELECT id FROM rows ORDER BY emb <#> (SELECT v::text::embedding FROM q) LIMIT 5) s");
        assert_eq!(ids, direct);
    }

    #[pg_test]
    fn pgvector_casts_when_available() {
        let available = Spi::get_one::<bool>(
            "SELECT count(*) > 0 FROM pg_available_extensions WHERE name = 'vector'",
        )
        .unwrap()
        .unwrap();
        if !available {
            assert_eq!(
                Spi::get_one::<bool>("SELECT rsclip_create_vector_casts()").unwrap(),
                Some(false)
            );
            return;
        }
        Spi::run("CREATE EXTENSION IF NOT EXISTS vector").unwrap();
        assert_eq!(
            Spi::get_one::<bool>("SELECT rsclip_create_vector_casts()").unwrap(),
            Some(true)
        );
        assert_eq!(text("SELECT '[1,2.5]'::vector::embedding::text"), "[1,2.5]");
        assert_eq!(text("SELECT '[1,2.5]'::embedding::vector::text"), "[1,2.5]");
        assert_error(
            "SELECT '[1,2.5]'::vector::embedding(3)",
            "22000",
            "expected 3 dimensions, not 2",
        );
        assert_eq!(
            Spi::get_one::<bool>("SELECT rsclip_create_vector_casts()").unwrap(),
            Some(true)
        );
    }

    // ---- encoders, on the committed fixture (the test server's rsclip.model_path) ----

    #[pg_test]
    fn encoders_in_a_transaction() {
        // Unit-length embeddings of the model's dimension; NULL in, NULL out.
        assert!(
            (float("SELECT embedding_norm(rsclip_encode_text('a harbour'))") - 1.0).abs() < 1e-5
        );
        assert_eq!(
            Spi::get_one::<i32>("SELECT embedding_dims(rsclip_encode_text('a harbour'))")
                .unwrap()
                .unwrap(),
            32
        );
        assert!(Spi::get_one::<bool>(
            "SELECT rsclip_encode_text(NULL) IS NULL AND rsclip_encode_image(NULL) IS NULL"
        )
        .unwrap()
        .unwrap());
        // Deterministic, and array forms equal single calls.
        assert_eq!(
            text("SELECT rsclip_encode_text('flooded farmland')::text"),
            text("SELECT (rsclip_encode_texts(ARRAY['x', 'flooded farmland']))[2]::text")
        );
        // A text-only transaction loads the text graph once and never the vision graph.
        Spi::run("SELECT rsclip_encode_text(t) FROM unnest(ARRAY['a','b','c']) t").unwrap();
        let info = text("SELECT rsclip_model_info()::text");
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["load_counts"]["text"], 1, "{info}");
        assert_eq!(info["sessions_loaded"]["vision"], false, "{info}");
        assert_eq!(info["embedding_dim"], 32);
        // The probability is SigLIP's sigmoid of the scaled cosine, from the manifest.
        let scale = info["logit_scale"].as_f64().unwrap();
        let bias = info["logit_bias"].as_f64().unwrap();
        let cos = float("SELECT rsclip_score(rsclip_encode_text('a'), rsclip_encode_text('b'))");
        let want = 1.0 / (1.0 + (-(cos * scale.exp() + bias)).exp());
        let got =
            float("SELECT rsclip_probability(rsclip_encode_text('a'), rsclip_encode_text('b'))");
        assert!((got - want).abs() <= 1e-9 + 1e-6 * want, "{got} vs {want}");
    }

    #[pg_test]
    fn cache_in_a_transaction() {
        let stat = |name: &str| {
            Spi::get_one::<i64>(&format!("SELECT {name} FROM rsclip_cache_stats()"))
                .unwrap()
                .unwrap()
        };
        Spi::run("SET LOCAL rsclip.cache = off").unwrap();
        let fresh = text("SELECT rsclip_encode_text('cached in a transaction')::text");
        assert_eq!(stat("misses"), 0);
        Spi::run("SET LOCAL rsclip.cache = on; SET LOCAL rsclip.cache_lru_size = 0").unwrap();
        let rows = stat("table_rows");
        assert_eq!(
            text("SELECT rsclip_encode_text('cached in a transaction')::text"),
            fresh
        );
        assert_eq!((stat("misses"), stat("table_rows")), (1, rows + 1));
        // the row written by this transaction serves the next statement
        assert_eq!(
            text("SELECT rsclip_encode_text('Cached  IN a transaction')::text"),
            fresh
        );
        assert_eq!((stat("misses"), stat("table_hits")), (1, 1));
        let hits = Spi::get_one::<i64>(
            "SELECT hits FROM rsclip_cache WHERE kind = 'text' ORDER BY created DESC LIMIT 1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(hits, 1);
    }

    #[pg_test]
    fn encoder_bad_input_is_an_error_and_the_transaction_goes_on() {
        assert_error("SELECT rsclip_encode_image(''::bytea)", "22P03", "empty");
        assert_error(
            "SELECT rsclip_encode_image('\\x00010203'::bytea)",
            "22023",
            "format",
        );
        assert_error(
            "SELECT rsclip_encode_image('\\xffd8ffe000104a464946'::bytea)",
            "22P03",
            "JPEG",
        );
        // A JPEG frame header declaring 0x0 pixels.
        assert_error(
            "SELECT rsclip_encode_image('\\xffd8ffc0000b080000000001011100ffd9'::bytea)",
            "22P03",
            "0x0",
        );
        assert_error(
            "SELECT rsclip_probability('[1,0]'::embedding, '[1,0,0]'::embedding)",
            "22000",
            "dimensions",
        );
        // Still usable afterwards, in the same transaction.
        assert!(
            (float("SELECT embedding_norm(rsclip_encode_text('still alive'))") - 1.0).abs() < 1e-5
        );
    }

    // ---- the rsclip index access method ----

    /// `n` rows of `dims`-d vectors around 8 well-separated centres (deterministic).
    fn clustered_table(name: &str, dims: usize, n: usize) {
        Spi::run(&format!(
            "SELECT setseed(0.42);
             CREATE TABLE {name} (id int PRIMARY KEY, emb embedding({dims}));
             INSERT INTO {name}
             SELECT i, rsclip_normalize(array_agg(((i % 8) = (d % 8))::int * 3 + random() - 0.5
                                                  ORDER BY d)::real[]::embedding)
             FROM generate_series(1, {n}) i, generate_series(1, {dims}) d GROUP BY i;"
        ))
        .unwrap();
    }

    fn ids(sql: &str) -> Vec<i32> {
        Spi::get_one::<Vec<i32>>(&format!("SELECT array_agg(id) FROM ({sql}) s"))
            .unwrap()
            .unwrap_or_default()
    }

    fn recall(index_sql: &str) -> f64 {
        Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_indexscan = on").unwrap();
        let got = ids(index_sql);
        Spi::run("SET LOCAL enable_seqscan = on; SET LOCAL enable_indexscan = off").unwrap();
        let want = ids(index_sql);
        Spi::run("RESET enable_seqscan; RESET enable_indexscan").unwrap();
        assert_eq!(want.len(), 10, "{index_sql}");
        got.iter().filter(|i| want.contains(i)).count() as f64 / want.len() as f64
    }

    #[pg_test]
    fn index_build_scan_insert_and_check() {
        clustered_table("ix", 32, 3000);
        for (ops, op) in [
            ("embedding_ip_ops", "<#>"),
            ("embedding_cosine_ops", "<=>"),
            ("embedding_l2_ops", "<->"),
        ] {
            Spi::run(&format!(
                "CREATE INDEX ix_{op_name} ON ix USING rsclip (emb {ops})",
                op_name = &ops[10..12]
            ))
            .unwrap();
            let q = format!(
                "SELECT id FROM ix ORDER BY emb {op} (SELECT emb FROM ix WHERE id = 7) LIMIT 10"
            );
            let plan = plan(&q);
            assert!(plan.contains("Index Scan using ix_"), "{plan}");
            let r = recall(&q);
            assert!(r >= 0.9, "{ops}: recall {r}");
        }
        // Inserts after the build are found; a NULL goes to the NULL chain, which only the
        // NULLS FIRST operator `<#^` returns.
        Spi::run(
            "INSERT INTO ix VALUES (100001, (SELECT emb FROM ix WHERE id = 7)), (100002, NULL)",
        )
        .unwrap();
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        let near =
            ids("SELECT id FROM ix ORDER BY emb <#> (SELECT emb FROM ix WHERE id = 7) LIMIT 2");
        assert!(near.contains(&100001) && near.contains(&7), "{near:?}");
        let check: serde_json::Value =
            serde_json::from_str(&text("SELECT rsclip_index_check('ix_ip')::text")).unwrap();
        assert_eq!(check["index_tuples"], 3002, "{check}");
        assert_eq!(check["null_tuples"], 1, "{check}");
        assert_eq!(check["heap_rows_checked"], 3002, "{check}");
        let all =
            ids("SELECT id FROM ix ORDER BY emb <#> (SELECT emb FROM ix WHERE id = 7) LIMIT 5000");
        assert!(!all.is_empty() && !all.contains(&100002), "{}", all.len());
        let q = "SELECT id FROM ix ORDER BY emb <#^ (SELECT emb FROM ix WHERE id = 7) LIMIT 3";
        assert!(plan(q).contains("Index Scan using ix_ip"), "{}", plan(q));
        let first = ids(q);
        assert_eq!(first[0], 100002, "{first:?}");
        assert!(
            first[1..].contains(&7) && first[1..].contains(&100001),
            "{first:?}"
        );
        // Without ORDER BY the index is never chosen.
        Spi::run("RESET enable_seqscan").unwrap();
        let counted = plan("SELECT count(*) FROM ix");
        assert!(!counted.contains("ix_ip"), "{counted}");
        // Query of the wrong dimension, through the index.
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        assert_error(
            "SELECT id FROM ix ORDER BY emb <#> '[1,2,3]' LIMIT 1",
            "22000",
            "expected 32 dimensions, not 3",
        );
    }

    #[pg_test]
    fn index_on_empty_table_truncate_and_reindex() {
        Spi::run("CREATE TABLE e (id int, emb embedding(4)); CREATE INDEX e_ix ON e USING rsclip (emb embedding_l2_ops)").unwrap();
        Spi::run("INSERT INTO e SELECT i, ARRAY[i, 0, 0, 0]::real[]::embedding FROM generate_series(1, 500) i").unwrap();
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        assert_eq!(
            ids("SELECT id FROM e ORDER BY emb <-> '[250.2,0,0,0]' LIMIT 3"),
            vec![250, 251, 249]
        );
        Spi::run("TRUNCATE e").unwrap();
        assert_eq!(
            ids("SELECT id FROM e ORDER BY emb <-> '[1,0,0,0]' LIMIT 3"),
            Vec::<i32>::new()
        );
        Spi::run("INSERT INTO e SELECT i, ARRAY[i, 0, 0, 0]::real[]::embedding FROM generate_series(1, 100) i").unwrap();
        Spi::run("REINDEX INDEX e_ix").unwrap();
        assert_eq!(
            ids("SELECT id FROM e ORDER BY emb <-> '[10,0,0,0]' LIMIT 1"),
            vec![10]
        );
        let check: serde_json::Value =
            serde_json::from_str(&text("SELECT rsclip_index_check('e_ix')::text")).unwrap();
        assert_eq!(check["index_tuples"], 100, "{check}");
        // Forced onto the index without an ORDER BY (PostgreSQL 18 prefers it to a disabled
        // sequential scan; 15 does not), it refuses rather than silently returning nothing.
        if plan("SELECT count(*) FROM e").contains("e_ix") {
            assert_error(
                "SELECT count(*) FROM e",
                "0A000",
                "can only be scanned with ORDER BY",
            );
        } else {
            assert_eq!(outcome("SELECT count(*) FROM e"), "ok");
        }
    }

    #[pg_test]
    fn index_null_query_and_scan_statistics() {
        clustered_table("nq", 16, 600);
        Spi::run("INSERT INTO nq VALUES (9001, NULL)").unwrap();
        Spi::run("CREATE INDEX nq_ix ON nq USING rsclip (emb embedding_ip_ops) WITH (lists = 6)")
            .unwrap();
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        // A query that is NULL at run time (a literal NULL is folded away by the planner): every
        // distance is NULL, so every indexed row comes back (a sequential scan's sort would
        // return them too), with a NULL distance.
        let q = "SELECT id, emb <#> (SELECT emb FROM nq WHERE id = 9001) AS d FROM nq \
                 ORDER BY emb <#> (SELECT emb FROM nq WHERE id = 9001) LIMIT 1000";
        assert!(plan(q).contains("Index Scan using nq_ix"), "{}", plan(q));
        let counts =
            Spi::get_two::<i64, i64>(&format!("SELECT count(DISTINCT id), count(d) FROM ({q}) s"))
                .unwrap();
        assert_eq!(counts, (Some(600), Some(0)));
        // Every scan is counted for pg_stat_*_indexes.idx_scan (once per rescan).
        let scans = || {
            Spi::get_one::<i64>("SELECT pg_stat_get_xact_numscans('nq_ix'::regclass)")
                .unwrap()
                .unwrap()
        };
        let before = scans();
        for id in [3, 4, 5] {
            let near = ids(&format!(
                "SELECT id FROM nq ORDER BY emb <#> (SELECT emb FROM nq WHERE id = {id}) LIMIT 1"
            ));
            assert_eq!(near, vec![id]);
        }
        assert_eq!(scans() - before, 3);
        // PostgreSQL 18's EXPLAIN ANALYZE shows the searches of the scan.
        #[cfg(feature = "pg18")]
        {
            Spi::run(
                "CREATE FUNCTION pg_temp.analyzed(q text) RETURNS text LANGUAGE plpgsql AS $$
                 DECLARE r record; result text := '';
                 BEGIN FOR r IN EXECUTE 'EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) ' || q LOOP
                     result := result || r.\"QUERY PLAN\" || E'\\n'; END LOOP; RETURN result; END $$",
            )
            .unwrap();
            let analyzed = text(
                "SELECT pg_temp.analyzed('SELECT id FROM nq ORDER BY emb <#> \
                 (SELECT emb FROM nq WHERE id = 3) LIMIT 1')",
            );
            assert!(analyzed.contains("Index Searches: 1"), "{analyzed}");
        }
    }

    #[pg_test]
    fn index_definition_errors() {
        Spi::run("CREATE TABLE d (id int, emb embedding, e2 embedding(3))").unwrap();
        assert_error(
            "CREATE INDEX ON d USING rsclip (emb embedding_ip_ops)",
            "22023",
            "does not have dimensions",
        );
        assert_error(
            "CREATE INDEX ON d USING rsclip ((rsclip_normalize(e2)) embedding_ip_ops)",
            "0A000",
            "expressions",
        );
        assert_error(
            "CREATE INDEX ON d USING rsclip (e2 embedding_ip_ops) WITH (lists = -1)",
            "22023",
            "lists",
        );
        Spi::run("CREATE INDEX d_ok ON d USING rsclip (e2 embedding_ip_ops) WITH (lists = 3)")
            .unwrap();
        Spi::run("CREATE INDEX d_btree ON d (id)").unwrap();
        assert_error(
            "SELECT rsclip_index_check('d_btree')",
            "42809",
            "not an rsclip index",
        );
        assert_error("SELECT rsclip_index_check('d')", "42809", "not an index");
    }
}
