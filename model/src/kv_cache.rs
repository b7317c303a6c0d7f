//! The key/value cache: one pool of fixed-size blocks per model, allocated
//! once, written in place. Every layer holds its keys and values in one
//! tensor of `[slots, kv_heads, head_dim]` (a slot per cached position, a
//! block being [`BLOCK_SIZE`] consecutive slots); a sequence's [`KvCache`]
//! is its block table: which blocks hold its positions, in order. Nothing
//! is concatenated or allocated per step: a step writes its new keys and
//! values into their slots and reads each sequence's blocks back.
//!
//! Block 0 is never handed out: it pads block tables to a common length
//! in batched decode attention, and stays zero.
//!
//! With prefix caching on ([`KvPool::set_prefix_caching`]), full blocks are
//! shared between sequences whose tokens up to them are the same
//! ([`crate::block_pool`]): [`KvCache::share_prefix`] starts a sequence
//! from them, [`KvCache::register_full_blocks`] offers its own.

use std::sync::{Arc, Mutex, MutexGuard};

use tch::{Device, Kind, TchError, Tensor};

use crate::block_pool::{BlockHash, BlockPool, chain};
use crate::error::ForwardError;
use tramontane_config::ModelSpec;
pub use tramontane_policy::kv_blocks::{BLOCK_SIZE, blocks_for};

/// The block every padded table entry points at.
const PADDING_BLOCK: u32 = 0;

type SharedBlocks = Arc<Mutex<BlockPool>>;

fn lock(blocks: &SharedBlocks) -> MutexGuard<'_, BlockPool> {
    // The pool stays consistent whatever panicked while it was held: no
    // change to it can panic half-way.
    blocks
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The pool: every layer's keys and values, `[slots, kv_heads, head_dim]`;
/// with latent attention, every layer's latent vector and rotary key side
/// by side in `keys` (`[slots, 1, kv_lora_rank + rope_dim]`) and no values.
pub struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    blocks: SharedBlocks,
}

/// The pool cannot hold what a step needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache is full: {needed} more blocks needed, {free} free of the pool's {total}")]
pub struct KvCacheFull {
    pub needed: usize,
    pub free: usize,
    pub total: usize,
}

impl KvPool {
    /// A pool that holds `tokens` positions (rounded up to whole blocks) for
    /// every layer of `spec`, zeroed, in `kind` on `device`.
    pub fn new(spec: &ModelSpec, tokens: usize, kind: Kind, device: Device) -> Self {
        let blocks = blocks_for(tokens) + 1; // + the padding block
        let slots = (blocks * BLOCK_SIZE) as i64;
        let a = &spec.attention;
        let (shape, values) = match &a.latent {
            Some(latent) => ([slots, 1, latent.cached_width() as i64], false),
            None => ([slots, a.kv_heads as i64, a.head_dim as i64], true),
        };
        let layer = || Tensor::zeros(shape, (kind, device));
        let keys: Vec<Tensor> = spec.layers.iter().map(|_| layer()).collect();
        let values: Vec<Tensor> = match values {
            true => spec.layers.iter().map(|_| layer()).collect(),
            false => Vec::new(),
        };
        Self {
            keys,
            values,
            blocks: Arc::new(Mutex::new(BlockPool::new(blocks))),
        }
    }

    /// Turns prefix caching on or off (off at first).
    pub fn set_prefix_caching(&self, on: bool) {
        lock(&self.blocks).prefix_caching = on;
    }

    /// An empty cache for one sequence, drawing its blocks from this pool.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            blocks: Vec::new(),
            hashes: Vec::new(),
            positions: 0,
            pool: self.blocks.clone(),
        }
    }

    /// Positions the pool holds in all (padding block excluded).
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks() * BLOCK_SIZE
    }

    /// Blocks that can be handed out in all.
    pub fn total_blocks(&self) -> usize {
        lock(&self.blocks).total
    }

    /// Blocks not held by any cache: free, or cached and evictable.
    pub fn free_blocks(&self) -> usize {
        lock(&self.blocks).available()
    }

    /// Blocks some cache holds (neither free nor only cached).
    pub fn held_blocks(&self) -> usize {
        lock(&self.blocks).held()
    }

    /// How many blocks of the prefix [`KvCache::share_prefix`] would give
    /// `tokens` some cache holds now: blocks a new sequence would share
    /// without taking any.
    pub fn held_prefix_blocks(&self, tokens: &[u32]) -> usize {
        lock(&self.blocks).held_prefix(&prefix_hashes(tokens))
    }

    /// Blocks the prefix cache knows (held or evictable).
    pub fn cached_blocks(&self) -> usize {
        lock(&self.blocks).cached()
    }

    /// Cached blocks handed out again since the start.
    pub fn evictions(&self) -> u64 {
        lock(&self.blocks).evictions
    }

    /// Bytes of every layer's keys and values, the padding block included.
    pub fn bytes(&self) -> u64 {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }

    /// Layer `layer`'s key storage (or latent vectors), `[slots, kv_heads,
    /// width]`.
    pub(crate) fn keys(&self, layer: usize) -> &Tensor {
        &self.keys[layer]
    }

    /// Whether `cache` draws from this pool.
    pub fn owns(&self, cache: &KvCache) -> bool {
        Arc::ptr_eq(&self.blocks, &cache.pool)
    }

    /// Writes `[tokens, kv_heads, head_dim]` keys and values of layer `layer`
    /// into `slots` (`[tokens]`, i64).
    pub(crate) fn write(
        &self,
        layer: usize,
        slots: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(), ForwardError> {
        let _ = self.keys[layer]
            .shallow_clone()
            .f_index_copy_(0, slots, keys)?;
        let _ = self.values[layer]
            .shallow_clone()
            .f_index_copy_(0, slots, values)?;
        Ok(())
    }

    /// Writes `[tokens, 1, width]` latent vectors of layer `layer` into
    /// `slots` (`[tokens]`, i64).
    pub(crate) fn write_latent(
        &self,
        layer: usize,
        slots: &Tensor,
        latent: &Tensor,
    ) -> Result<(), ForwardError> {
        let _ = self.keys[layer]
            .shallow_clone()
            .f_index_copy_(0, slots, latent)?;
        Ok(())
    }

    /// Layer `layer`'s latent vectors of the blocks of `table`
    /// (`[sequences, blocks]`, i64): `[sequences, blocks * BLOCK_SIZE, 1,
    /// width]`.
    pub(crate) fn gather_latent(&self, layer: usize, table: &Tensor) -> Result<Tensor, TchError> {
        gather_blocks(&self.keys[layer], table)
    }

    /// Layer `layer`'s keys and values, `[slots, kv_heads, head_dim]` each.
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Layer `layer`'s keys and values of the blocks of `table`
    /// (`[sequences, blocks]`, i64): `[sequences, blocks * BLOCK_SIZE,
    /// kv_heads, head_dim]` each.
    pub(crate) fn gather(
        &self,
        layer: usize,
        table: &Tensor,
    ) -> Result<(Tensor, Tensor), TchError> {
        Ok((
            gather_blocks(&self.keys[layer], table)?,
            gather_blocks(&self.values[layer], table)?,
        ))
    }
}

/// The blocks of `table` (`[sequences, blocks]`, i64) of one layer's
/// `pool` (`[slots, heads, width]`): `[sequences, blocks * BLOCK_SIZE,
/// heads, width]`.
fn gather_blocks(pool: &Tensor, table: &Tensor) -> Result<Tensor, TchError> {
    let size = table.size();
    let shape = pool.size();
    let (heads, width) = (shape[1], shape[2]);
    pool.f_view([-1, BLOCK_SIZE as i64, heads, width])?
        .f_index_select(0, &table.f_view([-1])?)?
        .f_view([size[0], size[1] * BLOCK_SIZE as i64, heads, width])
}

/// One sequence's share of a [`KvPool`]: its block table and how many
/// positions it holds. Dropping it returns its blocks to the pool.
pub struct KvCache {
    blocks: Vec<u32>,
    /// The hashes of its first full blocks, those registered or shared.
    hashes: Vec<BlockHash>,
    positions: usize,
    pool: SharedBlocks,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("blocks", &self.blocks)
            .field("positions", &self.positions)
            .finish()
    }
}

impl KvCache {
    /// Positions already held (the position of the next token).
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Blocks held.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Positions the held blocks have room for.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_SIZE
    }

    /// Makes room for `positions` positions in all, taking blocks from the
    /// pool; takes none when the pool has too few.
    pub fn reserve(&mut self, positions: usize) -> Result<(), KvCacheFull> {
        let needed = blocks_for(positions).saturating_sub(self.blocks.len());
        if needed == 0 {
            return Ok(());
        }
        let taken = lock(&self.pool).take(needed)?;
        self.blocks.extend(taken);
        Ok(())
    }

    /// Starts an empty cache from the longest run of cached blocks that
    /// `tokens` begin with, at most all but the last token's (whose logits
    /// the next step computes); returns the positions it now holds.
    pub fn share_prefix(&mut self, tokens: &[u32]) -> usize {
        debug_assert!(
            self.blocks.is_empty(),
            "a prefix is shared into an empty cache only"
        );
        let mut pool = lock(&self.pool);
        if !pool.prefix_caching || tokens.is_empty() {
            return 0;
        }
        let mut hashes = prefix_hashes(tokens);
        self.blocks = pool.share(&hashes);
        hashes.truncate(self.blocks.len());
        self.hashes = hashes;
        self.positions = self.blocks.len() * BLOCK_SIZE;
        self.positions
    }

    /// Offers the full blocks written since the last call to the prefix
    /// cache; `tokens` are the tokens at this cache's positions (at least
    /// [`KvCache::positions`] of them).
    pub fn register_full_blocks(&mut self, tokens: &[u32]) {
        let full = self.positions.min(tokens.len()) / BLOCK_SIZE;
        if self.hashes.len() >= full {
            return;
        }
        let mut pool = lock(&self.pool);
        if !pool.prefix_caching {
            return;
        }
        for i in self.hashes.len()..full {
            let hash = chain(
                self.hashes.last(),
                &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
            );
            pool.register(self.blocks[i], hash);
            self.hashes.push(hash);
        }
    }

    /// The slot of position `position` (which must be reserved).
    pub(crate) fn slot(&self, position: usize) -> i64 {
        let block = self.blocks[position / BLOCK_SIZE] as usize;
        (block * BLOCK_SIZE + position % BLOCK_SIZE) as i64
    }

    /// Marks `positions` positions as written.
    pub(crate) fn advance_to(&mut self, positions: usize) {
        debug_assert!(positions <= self.capacity());
        self.positions = positions;
    }

    /// Drops every position from `positions` on and returns the blocks no
    /// longer needed: undoes a forward step that failed half-way.
    pub fn truncate(&mut self, positions: usize) {
        self.positions = self.positions.min(positions);
        self.hashes.truncate(positions / BLOCK_SIZE);
        let keep = blocks_for(positions);
        if self.blocks.len() > keep {
            let mut pool = lock(&self.pool);
            for block in self.blocks.drain(keep..).rev() {
                pool.release(block);
            }
        }
    }

    /// This cache's block table padded to `blocks` entries with the padding
    /// block, as i64.
    pub(crate) fn padded_table(&self, blocks: usize) -> impl Iterator<Item = i64> + '_ {
        self.blocks
            .iter()
            .copied()
            .chain(std::iter::repeat(PADDING_BLOCK))
            .take(blocks)
            .map(i64::from)
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.truncate(0);
    }
}

/// The chained hashes of the whole blocks of `tokens` but its last token
/// (whose logits a step computes): the prefix a new sequence may share.
fn prefix_hashes(tokens: &[u32]) -> Vec<BlockHash> {
    let mut hashes: Vec<BlockHash> = Vec::new();
    if let Some((_, before_last)) = tokens.split_last() {
        for block in before_last.chunks_exact(BLOCK_SIZE) {
            hashes.push(chain(hashes.last(), block));
        }
    }
    hashes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(tokens: usize) -> KvPool {
        let spec = ModelSpec::from_json(
            r#"{"model_type": "mixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
                "num_experts_per_tok": 2, "vocab_size": 64}"#,
        )
        .unwrap();
        KvPool::new(&spec, tokens, Kind::Float, Device::Cpu)
    }

    #[test]
    fn blocks_come_back_when_a_cache_is_truncated_or_dropped() {
        let pool = pool(64);
        assert_eq!(pool.total_blocks(), 4);
        // 2 layers × (keys + values) × 5 blocks × 16 slots × 2 heads × 4 dims × 4 bytes
        assert_eq!(pool.bytes(), 2 * 2 * 5 * 16 * 2 * 4 * 4);
        let mut a = pool.new_cache();
        a.reserve(17).unwrap();
        assert_eq!(a.blocks().len(), 2);
        assert!(!a.blocks().contains(&PADDING_BLOCK));
        let mut b = pool.new_cache();
        let full = b.reserve(40).unwrap_err();
        assert_eq!(
            full,
            KvCacheFull {
                needed: 3,
                free: 2,
                total: 4
            }
        );
        assert!(b.blocks().is_empty(), "a refused reservation takes nothing");
        a.truncate(16);
        assert_eq!(a.blocks().len(), 1);
        b.reserve(40).unwrap();
        assert_eq!(pool.free_blocks(), 0);
        drop(b);
        assert_eq!(pool.free_blocks(), 3);
        assert!(pool.owns(&a));
        assert!(!self::pool(16).owns(&a));
    }

    #[test]
    fn a_latent_pool_holds_the_latent_vector_and_rotary_key_only() {
        let spec = ModelSpec::from_json(
            r#"{"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64,
                "intermediate_size": 96, "moe_intermediate_size": 16, "n_routed_experts": 8,
                "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_attention_heads": 4,
                "n_group": 4, "topk_group": 2, "vocab_size": 80, "q_lora_rank": 20,
                "kv_lora_rank": 24, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8,
                "v_head_dim": 10}"#,
        )
        .unwrap();
        let pool = KvPool::new(&spec, 64, Kind::Float, Device::Cpu);
        // 3 layers × 5 blocks × 16 slots × (24 + 8) values × 4 bytes: no
        // values tensor, no per-head keys (4 × (20 + 10) = 120 values a
        // position expanded).
        assert_eq!(pool.bytes(), 3 * 5 * 16 * 32 * 4);
        assert_eq!(pool.values.len(), 0);
        let latent = spec.attention.latent.unwrap();
        assert_eq!(latent.expanded_width(4), 120);
    }

    #[test]
    fn slots_follow_the_block_table() {
        let pool = pool(64);
        let mut a = pool.new_cache();
        let mut b = pool.new_cache();
        a.reserve(1).unwrap();
        b.reserve(1).unwrap();
        a.reserve(20).unwrap();
        let (first, second) = (a.blocks()[0] as i64, a.blocks()[1] as i64);
        assert_eq!(a.slot(3), first * 16 + 3);
        assert_eq!(a.slot(17), second * 16 + 1);
        let table: Vec<i64> = a.padded_table(4).collect();
        assert_eq!(table, vec![first, second, 0, 0]);
    }
}
