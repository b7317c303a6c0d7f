//! Benchmark prompts: pseudo-random token ids from a formula that
//! benches/forward_vs_hf.py computes too, so both sides see the same tokens
//! (and so the same expert load).

/// Token `position` of prompt `sequence`: ids in [3, vocab), skipping the
/// special tokens 0..3.
pub fn bench_token(sequence: usize, position: usize, vocab: usize) -> u32 {
    let mixed =
        ((sequence as u64) * 7919 + (position as u64) * 104_729).wrapping_mul(2_654_435_761);
    3 + (mixed % (vocab as u64 - 3)) as u32
}

/// `batch` prompts of `len` tokens.
pub fn prompts(batch: usize, len: usize, vocab: usize) -> Vec<Vec<u32>> {
    (0..batch)
        .map(|s| (0..len).map(|p| bench_token(s, p, vocab)).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_stay_clear_of_the_special_ids() {
        let ids: Vec<u32> = prompts(4, 64, 32000).concat();
        assert!(ids.iter().all(|&t| (3..32000).contains(&t)));
        // What benches/forward_vs_hf.py's bench_token gives.
        assert_eq!(bench_token(1, 2, 32000), 22006);
        assert_eq!(bench_token(5, 511, 32000), 6934);
        assert_eq!(bench_token(0, 0, 32000), 3);
    }
}
