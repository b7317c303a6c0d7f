//! Into how many micro-batches a step splits, whose layers interleave (one
//! micro-batch's attention runs while another's experts are out).

/// Into how many micro-batches a step splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroBatches {
    /// 2 for steps of at least [`MicroBatches::AUTO_FROM_TOKENS`] tokens
    /// (and 2 sequences), else 1.
    Auto,
    /// This many (at most one per sequence).
    Fixed(usize),
}

impl std::str::FromStr for MicroBatches {
    type Err = String;

    /// `auto` or a count of at least 1.
    fn from_str(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(MicroBatches::Auto);
        }
        match text.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(MicroBatches::Fixed(n)),
            _ => Err(format!(
                "{text:?} is neither auto nor a count of at least 1"
            )),
        }
    }
}

impl MicroBatches {
    /// Under `Auto`, steps of fewer tokens run as one batch. Each
    /// micro-batch reads every routed expert's weights again: at decode
    /// sizes (a few rows per expert, bound by memory) that costs more than
    /// the overlap hides (on the `bench` model, decode batch 32 fell from
    /// 157 to 114 tokens/s with 2). From a few hundred tokens (prefill) the
    /// experts' GEMMs are bound by compute and a split costs little.
    pub const AUTO_FROM_TOKENS: usize = 256;

    pub fn groups(self, sequences: usize, tokens: usize) -> usize {
        match self {
            MicroBatches::Auto if tokens >= Self::AUTO_FROM_TOKENS && sequences >= 2 => 2,
            MicroBatches::Auto => 1,
            MicroBatches::Fixed(n) => n.clamp(1, sequences.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_parse_and_split_by_batch_size() {
        assert_eq!("auto".parse(), Ok(MicroBatches::Auto));
        assert_eq!("3".parse(), Ok(MicroBatches::Fixed(3)));
        assert!(
            "0".parse::<MicroBatches>()
                .unwrap_err()
                .contains("at least 1")
        );
        assert!("two".parse::<MicroBatches>().is_err());
        let from = MicroBatches::AUTO_FROM_TOKENS;
        assert_eq!(MicroBatches::Auto.groups(32, 32), 1, "decode");
        assert_eq!(MicroBatches::Auto.groups(8, from - 1), 1);
        assert_eq!(MicroBatches::Auto.groups(8, from), 2, "prefill");
        assert_eq!(MicroBatches::Auto.groups(1, 4 * from), 1, "one sequence");
        assert_eq!(MicroBatches::Fixed(4).groups(2, 2), 2);
        assert_eq!(MicroBatches::Fixed(4).groups(0, 0), 1);
    }
}
