//! The KV cache's unit of allocation: a block of [`BLOCK_SIZE`] consecutive
//! positions of one sequence. The router's pool hands out blocks, admission
//! counts them, and the planner's simulation counts them the same way.

/// Positions per block.
pub const BLOCK_SIZE: usize = 16;

/// Blocks needed to hold `positions` positions.
pub fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_up_to_whole_blocks() {
        assert_eq!(blocks_for(0), 0);
        assert_eq!(blocks_for(1), 1);
        assert_eq!(blocks_for(BLOCK_SIZE), 1);
        assert_eq!(blocks_for(BLOCK_SIZE + 1), 2);
    }
}
