//! rsclip: remote-sensing image-text retrieval (Git-RSCLIP) inside PostgreSQL.
//!
//! This crate is the thin pgrx layer. Formats and kernels live in `crates/rsclip-core`; every SQL
//! object is declared by hand in `sql/` and bound to the V1 functions defined here.

::pgrx::pg_module_magic!(name, version);

mod casts;
mod datum;
mod detoast_cache;
mod fmgr;
mod io;
mod operators;

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

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
