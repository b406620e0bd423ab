//! Corrupt pages must give errors, never panics.

use super::common::*;
use rsclip_index::format::{BLOCK_HEADER, PAGE_LIST};
use rsclip_index::page::memory::MemoryRelation;
use rsclip_index::page::{Opaque, PageRead, PageWrite, Relation};
use rsclip_index::rng::Rng;
use rsclip_index::{bulk_delete, check, insert, Error, Metric, Scan, INVALID_BLOCK};

const DIMS: usize = 32;

fn base() -> (MemoryRelation, Vec<f32>) {
    let data = mixture(400, 1_000, DIMS, 4, 0.5, 1.0, false);
    let rel = MemoryRelation::new();
    build(&rel, Metric::L2, DIMS, &data, 4, usize::MAX);
    (rel, data)
}

/// Run every operation; return the errors (panics propagate and fail the test).
fn all_ops(rel: &MemoryRelation, data: &[f32]) -> Vec<Result<(), Error>> {
    let q = &data[..DIMS];
    let scan = || -> Result<(), Error> {
        let mut s = Scan::new(rel, q, 1, 0)?;
        while s.next(rel, &mut |_| Some(1.0))?.is_some() {}
        Ok(())
    };
    vec![
        check(rel).map(|_| ()),
        scan(),
        bulk_delete(rel, &mut |t| t.offset == 1).map(|_| ()),
        insert(rel, tid_of(5_000), q).map(|_| ()),
    ]
}

fn assert_corrupt(r: &Result<impl std::fmt::Debug, Error>) {
    match r {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("expected corruption error, got {other:?}"),
    }
}

fn list_page_with_room(rel: &MemoryRelation) -> u32 {
    (1..rel.nblocks())
        .find(|&b| {
            rel.read(b).opaque().flags == PAGE_LIST
                && rel.read(b).max_offset() > 0
                && rel.read(b).free_space() > 64
        })
        .unwrap()
}

fn first_list_page(rel: &MemoryRelation) -> u32 {
    (1..rel.nblocks())
        .find(|&b| rel.read(b).opaque().flags == PAGE_LIST && rel.read(b).max_offset() > 0)
        .unwrap()
}

#[test]
fn corrupt_item_is_detected() {
    let (rel, data) = base();
    let blk = first_list_page(&rel);
    // more rows than a block holds
    rel.write(blk).item_mut(1).unwrap()[0..2].copy_from_slice(&999u16.to_le_bytes());
    assert_corrupt(&check(&rel));
    let errs = all_ops(&rel, &data);
    assert_corrupt(&errs[1]); // the scan visits every list
    let e = check(&rel).unwrap_err();
    assert!(e.to_string().contains(&format!("block {blk}")), "{e}");
}

#[test]
fn wrong_length_item_is_detected() {
    let (rel, data) = base();
    let blk = list_page_with_room(&rel);
    rel.write(blk).add_item(&[1u8; BLOCK_HEADER + 3]).unwrap();
    for r in all_ops(&rel, &data).iter().take(3) {
        assert_corrupt(r);
    }
}

#[test]
fn chain_cycle_is_detected() {
    let (rel, data) = base();
    let blk = first_list_page(&rel);
    // find the tail of that chain, point it back at the chain's first page
    let mut tail = blk;
    loop {
        let next = rel.read(tail).opaque().next;
        if next == INVALID_BLOCK {
            break;
        }
        tail = next;
    }
    rel.write(tail).set_opaque(Opaque {
        next: blk,
        flags: PAGE_LIST,
    });
    assert_corrupt(&check(&rel));
    let errs = all_ops(&rel, &data);
    assert_corrupt(&errs[1]);
    assert_corrupt(&errs[2]);
}

#[test]
fn bad_block_pointers_and_meta() {
    let (rel, data) = base();
    let blk = first_list_page(&rel);
    rel.write(blk).set_opaque(Opaque {
        next: rel.nblocks() + 10,
        flags: PAGE_LIST,
    });
    assert_corrupt(&check(&rel));
    let (rel, data2) = base();
    rel.write(0).item_mut(1).unwrap()[0] ^= 1;
    for r in all_ops(&rel, &data2) {
        assert_corrupt(&r);
    }
    let (rel, _) = base();
    let first_centroid = (1..rel.nblocks())
        .find(|&b| rel.read(b).opaque().flags == 2)
        .unwrap();
    rel.write(first_centroid).set_opaque(Opaque {
        next: INVALID_BLOCK,
        flags: PAGE_LIST,
    });
    for r in all_ops(&rel, &data) {
        assert_corrupt(&r);
    }
}

/// Random damage anywhere: every operation returns Ok or Err, none panics.
#[test]
fn random_damage_never_panics() {
    let (pristine, data) = base();
    let mut rng = Rng::new(500);
    let mut errors = 0;
    for _ in 0..300 {
        let rel = pristine.deep_clone();
        for _ in 0..1 + rng.below(3) {
            let blk = rng.below(rel.nblocks() as u64) as u32;
            let mut w = rel.write(blk);
            match rng.below(5) {
                0..=2 => {
                    let n = w.max_offset();
                    if n > 0 {
                        let off = 1 + rng.below(n as u64) as u16;
                        let item = w.item_mut(off).unwrap();
                        let pos = rng.below(item.len() as u64) as usize;
                        item[pos] ^= 1 << rng.below(8);
                    }
                }
                3 => {
                    let o = w.opaque();
                    let next = match rng.below(3) {
                        0 => rng.below(rel.nblocks() as u64 + 5) as u32,
                        1 => INVALID_BLOCK,
                        _ => o.next,
                    };
                    w.set_opaque(Opaque {
                        next,
                        flags: 1 << rng.below(4),
                    });
                }
                _ => {
                    let len = 1 + rng.below(64) as usize;
                    let junk: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
                    w.add_item(&junk);
                }
            }
        }
        errors += all_ops(&rel, &data).iter().filter(|r| r.is_err()).count();
    }
    println!("random damage: {errors} errors reported, no panics");
    assert!(errors > 100);
}
