//! rsclip: remote-sensing image-text retrieval (Git-RSCLIP) inside PostgreSQL.
//!
//! This crate is the thin pgrx layer. Formats and kernels live in `crates/rsclip-core`; every SQL
//! object is declared by hand in `sql/` and bound to the V1 functions defined here.

::pgrx::pg_module_magic!(name, version);

use pgrx::pg_sys;

mod backfill;
mod cache;
mod casts;
mod datum;
mod decoding;
mod detoast_cache;
mod encode;
mod fmgr;
mod index;
mod inference;
mod io;
mod model;
mod operators;
mod planner;
mod settings;

pgrx::extension_sql_file!(
    "../sql/embedding_type.sql",
    name = "embedding_type",
    bootstrap
);
pgrx::extension_sql_file!(
    "../sql/casts.sql",
    name = "casts",
    requires = ["embedding_type"]
);
pgrx::extension_sql_file!(
    "../sql/operators.sql",
    name = "operators",
    requires = ["casts"]
);
pgrx::extension_sql_file!(
    "../sql/pgvector_casts.sql",
    name = "pgvector_casts",
    requires = ["operators"]
);
pgrx::extension_sql_file!(
    "../sql/encoders.sql",
    name = "encoders",
    requires = ["pgvector_casts"]
);
pgrx::extension_sql_file!(
    "../sql/index.sql",
    name = "index_am",
    requires = ["encoders"]
);
pgrx::extension_sql_file!("../sql/cache.sql", name = "cache", requires = ["index_am"]);
pgrx::extension_sql_file!(
    "../sql/backfill.sql",
    name = "backfill",
    requires = ["cache"]
);

/// Registers the settings and the planner hook (planner.rs), and when preloaded the shared
/// inference workers and their queue (inference.rs). Nothing else happens at load time:
/// ONNX Runtime starts threads, and threads do not survive the postmaster's fork, so models
/// load lazily in each backend.
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    index::options::register();
    planner::install();
    // SAFETY: a plain global the postmaster sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        inference::preload();
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// Points the test server at the committed fixture model (copied into local state by
    /// tools/setup.sh) and the ONNX Runtime library of the pinned Python environment.
    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        let local = std::env::var("RSCLIP_LOCAL")
            .expect("RSCLIP_LOCAL is set by tools/env.sh (run make pgtest)");
        let library = std::env::var("RSCLIP_ONNXRUNTIME_LIBRARY")
            .expect("RSCLIP_ONNXRUNTIME_LIBRARY is set by tools/env.sh");
        vec![
            String::leak(format!("rsclip.model_path = '{local}/models/tiny-siglip'")),
            String::leak(format!("rsclip.onnxruntime_library = '{library}'")),
        ]
    }
}
