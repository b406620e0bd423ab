//! A per-backend cache of index centroids.
//!
//! A scan ranks every list by its centroid's distance to the query. Reading the centroid chain
//! costs one buffer access per page (about 400 pages for 1000 lists of 768 dimensions), which at
//! a million rows was most of a query's time. Centroids never change after the build (inserts
//! and VACUUM touch only list pages), so each backend keeps the ones it has read, keyed by what
//! changes whenever an index is rebuilt: the index OID, its relfilenumber (new on REINDEX,
//! TRUNCATE, VACUUM FULL), the meta page contents and the meta page's LSN. The meta page is
//! still read, under a share lock, on every scan to validate the entry.

use super::buffer::IndexRelation;
use super::raise;
use pgrx::pg_sys;
use rsclip_index::format::Meta;
use rsclip_index::page::Relation;
use rsclip_index::Centroids;
use std::cell::RefCell;
use std::sync::Arc;

/// Memory the cache may hold in one backend. A 1000-list, 768-dimension index takes 3 MB; the
/// entry being used is kept even when it alone is larger.
const CACHE_BYTES: usize = 64 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    index: pg_sys::Oid,
    relfile: u32,
    meta: Meta,
    meta_lsn: u64,
}

struct Entry {
    key: Key,
    centroids: Arc<Centroids>,
    last_used: u64,
}

#[derive(Default)]
struct Cache {
    entries: Vec<Entry>,
    clock: u64,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

fn relfile_number(index: pg_sys::Relation) -> u32 {
    // SAFETY: an open relation's cached physical locator.
    unsafe {
        #[cfg(feature = "pg15")]
        {
            (*index).rd_node.relNode.to_u32()
        }
        #[cfg(not(feature = "pg15"))]
        {
            (*index).rd_locator.relNumber.to_u32()
        }
    }
}

/// The centroids of `index` (read through `rel`), from the cache when still valid.
pub fn get(index: pg_sys::Relation, rel: &IndexRelation) -> Arc<Centroids> {
    let (meta, meta_lsn) = {
        let meta = rsclip_index::read_meta(rel).unwrap_or_else(|e| raise(index, e));
        (meta, rel.read(rsclip_index::format::META_BLOCK).lsn())
    };
    let key = Key {
        // SAFETY: an open relation.
        index: unsafe { (*index).rd_id },
        relfile: relfile_number(index),
        meta,
        meta_lsn,
    };
    let hit = CACHE.with_borrow_mut(|cache| {
        cache.clock += 1;
        let now = cache.clock;
        let entry = cache.entries.iter_mut().find(|e| e.key == key)?;
        entry.last_used = now;
        Some(Arc::clone(&entry.centroids))
    });
    if let Some(centroids) = hit {
        return centroids;
    }
    let centroids = Arc::new(Centroids::read(rel).unwrap_or_else(|e| raise(index, e)));
    if *centroids.meta() != meta {
        // Rebuilt between our two reads of the meta page: use it, but do not cache it.
        return centroids;
    }
    CACHE.with_borrow_mut(|cache| {
        // Older builds of this index can never match again.
        cache.entries.retain(|e| e.key.index != key.index);
        let mut bytes: usize = cache
            .entries
            .iter()
            .map(|e| e.centroids.memory_bytes())
            .sum();
        while bytes + centroids.memory_bytes() > CACHE_BYTES && !cache.entries.is_empty() {
            let oldest = (0..cache.entries.len())
                .min_by_key(|&i| cache.entries[i].last_used)
                .expect("not empty");
            bytes -= cache.entries.swap_remove(oldest).centroids.memory_bytes();
        }
        let last_used = cache.clock;
        cache.entries.push(Entry {
            key,
            centroids: Arc::clone(&centroids),
            last_used,
        });
    });
    centroids
}
