//! Popcount kernels for 1-bit codes (RaBitQ) against a 4-bit-plane query.
//!
//! The library is built for baseline x86-64, where `u64::count_ones` compiles to a ~15-instruction
//! bit trick. CPUs since 2008 have a `popcnt` instruction; the same loop compiled with that target
//! feature is chosen at run time, which makes scanning codes several times faster.

use std::sync::OnceLock;

/// `(popcount(code), [popcount(code & plane_j) for j in 0..4])` where `code` is `8 * w` bytes
/// (little-endian u64 words) and `planes` holds 4 words per code word (`planes[4 * i + j]`).
pub type PlaneCounts = (u32, [u32; 4]);

fn portable(code: &[u8], planes: &[u64]) -> PlaneCounts {
    let (mut pc, mut s) = (0u32, [0u32; 4]);
    for (c, p) in code.chunks_exact(8).zip(planes.chunks_exact(4)) {
        let x = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
        pc += x.count_ones();
        s[0] += (x & p[0]).count_ones();
        s[1] += (x & p[1]).count_ones();
        s[2] += (x & p[2]).count_ones();
        s[3] += (x & p[3]).count_ones();
    }
    (pc, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "popcnt")]
fn with_popcnt(code: &[u8], planes: &[u64]) -> PlaneCounts {
    // The same loop; with the feature enabled count_ones is one instruction.
    let (mut pc, mut s) = (0u32, [0u32; 4]);
    for (c, p) in code.chunks_exact(8).zip(planes.chunks_exact(4)) {
        let x = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
        pc += x.count_ones();
        s[0] += (x & p[0]).count_ones();
        s[1] += (x & p[1]).count_ones();
        s[2] += (x & p[2]).count_ones();
        s[3] += (x & p[3]).count_ones();
    }
    (pc, s)
}

#[cfg(target_arch = "x86_64")]
fn popcnt_entry(code: &[u8], planes: &[u64]) -> PlaneCounts {
    // SAFETY: only installed by `kernel()` after `is_x86_feature_detected!("popcnt")` said yes.
    unsafe { with_popcnt(code, planes) }
}

type Kernel = fn(&[u8], &[u64]) -> PlaneCounts;

fn kernel() -> Kernel {
    static BEST: OnceLock<Kernel> = OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("popcnt") {
            return popcnt_entry as Kernel;
        }
        portable as Kernel
    })
}

/// See [`PlaneCounts`]. `code.len()` must be a multiple of 8 and `planes.len() == code.len() / 2`.
#[inline]
pub fn plane_counts(code: &[u8], planes: &[u64]) -> PlaneCounts {
    assert!(code.len().is_multiple_of(8) && planes.len() == code.len() / 2);
    (kernel())(code, planes)
}

/// Name of the kernel in use (for benchmarks and logs).
pub fn kernel_name() -> &'static str {
    if kernel() as usize == portable as Kernel as usize {
        "portable"
    } else {
        "popcnt"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatched_kernel_equals_portable() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for words in [0usize, 1, 2, 12, 16, 250] {
            let code: Vec<u8> = (0..words * 8).map(|_| next() as u8).collect();
            let planes: Vec<u64> = (0..words * 4).map(|_| next()).collect();
            assert_eq!(
                plane_counts(&code, &planes),
                portable(&code, &planes),
                "{words} words"
            );
        }
        eprintln!("popcount kernel: {}", kernel_name());
    }
}
