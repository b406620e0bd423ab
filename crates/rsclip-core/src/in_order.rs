//! Matching a list against an earlier list it was derived from by dropping entries.

/// For each of `inputs`, the value of the next entry of `entries` (after the previous match)
/// whose key equals it, each entry used at most once; None where there is none, and such an
/// input does not consume the entries after it. Used by the backfill, whose next batch is the
/// prefetched one less the rows another backfill took meanwhile, in the same order.
pub fn take_in_order<K: AsRef<[u8]>, T>(entries: Vec<(K, T)>, inputs: &[&[u8]]) -> Vec<Option<T>> {
    let (keys, mut values): (Vec<K>, Vec<Option<T>>) =
        entries.into_iter().map(|(k, v)| (k, Some(v))).unzip();
    let mut next = 0;
    inputs
        .iter()
        .map(|input| {
            let at = next + keys[next..].iter().position(|k| k.as_ref() == *input)?;
            next = at + 1;
            values[at].take()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::take_in_order;

    fn entries() -> Vec<(Vec<u8>, u32)> {
        vec![(b"a".to_vec(), 1), (b"b".to_vec(), 2), (b"c".to_vec(), 3)]
    }

    #[test]
    fn all_in_order() {
        assert_eq!(
            take_in_order(entries(), &[b"a", b"b", b"c"]),
            [Some(1), Some(2), Some(3)]
        );
    }

    #[test]
    fn entries_dropped_in_between() {
        assert_eq!(take_in_order(entries(), &[b"a", b"c"]), [Some(1), Some(3)]);
    }

    #[test]
    fn an_unknown_input_does_not_hide_the_ones_after_it() {
        assert_eq!(take_in_order(entries(), &[b"x", b"b"]), [None, Some(2)]);
    }

    #[test]
    fn equal_keys_are_each_used_once() {
        let twice = vec![(b"a".to_vec(), 1), (b"a".to_vec(), 4)];
        assert_eq!(
            take_in_order(twice, &[b"a", b"a", b"a"]),
            [Some(1), Some(4), None]
        );
    }

    #[test]
    fn out_of_order_inputs_get_none_rather_than_a_wrong_value() {
        assert_eq!(take_in_order(entries(), &[b"c", b"a"]), [Some(3), None]);
        assert_eq!(take_in_order(Vec::<(Vec<u8>, u32)>::new(), &[b"a"]), [None]);
    }
}
