//! Which blocks of a KV pool are in use, and the prefix cache over them.
//!
//! A block is held by every cache whose table lists it (a reference count).
//! With prefix caching on, a full block is registered under the hash of its
//! tokens and of every token before it ([`chain`]); a new sequence starts
//! from the longest run of registered blocks its tokens hash to, sharing
//! them. A block nobody holds any more stays registered, and is *evictable*:
//! it is handed out again, least recently released first, only when no
//! block is free. Blocks are shared read-only: a sequence writes only
//! positions past its shared prefix, in blocks of its own.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};

use crate::kv_cache::KvCacheFull;

/// The hash of a full block: SHA-256 of the previous block's hash and this
/// block's token ids, so that equal hashes mean equal prefixes.
pub type BlockHash = [u8; 32];

/// The hash of a block of `tokens` after the block hashed `parent` (`None`
/// for the first block).
pub fn chain(parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = Sha256::new();
    if let Some(parent) = parent {
        hasher.update(parent);
    }
    for token in tokens {
        hasher.update(token.to_le_bytes());
    }
    hasher.finalize().into()
}

/// The pool's blocks: free, held, or cached and evictable.
#[derive(Debug)]
pub(crate) struct BlockPool {
    /// Blocks nobody holds and no hash names: handed out first.
    free: Vec<u32>,
    /// Caches holding each block (index: block id).
    holders: Vec<u32>,
    /// The hash each registered block is known by.
    hash_of: Vec<Option<BlockHash>>,
    /// Registered blocks by hash.
    by_hash: HashMap<BlockHash, u32>,
    /// Registered blocks nobody holds, by when they were released (oldest
    /// first), and each one's key in it.
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
    /// Blocks handed out in all (the padding block excluded).
    pub(crate) total: usize,
    /// Whether full blocks are registered and looked up.
    pub(crate) prefix_caching: bool,
    /// Cached blocks handed out again since the start.
    pub(crate) evictions: u64,
}

impl BlockPool {
    /// Blocks `1..blocks` (block 0 pads block tables and is never handed out).
    pub(crate) fn new(blocks: usize) -> Self {
        Self {
            // Handed out from the end: low blocks first.
            free: (1..blocks as u32).rev().collect(),
            holders: vec![0; blocks],
            hash_of: vec![None; blocks],
            by_hash: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; blocks],
            clock: 0,
            total: blocks.saturating_sub(1),
            prefix_caching: false,
            evictions: 0,
        }
    }

    /// Blocks that can be handed out now: free, or cached and evictable.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Registered blocks (held or evictable).
    /// Blocks some cache holds.
    pub(crate) fn held(&self) -> usize {
        self.total - self.available()
    }

    /// How many of the first blocks of `hashes` (as [`BlockPool::share`]
    /// would share them) some cache holds now.
    pub(crate) fn held_prefix(&self, hashes: &[BlockHash]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        hashes
            .iter()
            .map_while(|hash| self.by_hash.get(hash))
            .filter(|&&block| self.holders[block as usize] > 0)
            .count()
    }

    pub(crate) fn cached(&self) -> usize {
        self.by_hash.len()
    }

    /// `count` blocks, each held once: free ones first, then the least
    /// recently released cached ones (their hashes forgotten). None when
    /// fewer are available.
    pub(crate) fn take(&mut self, count: usize) -> Result<Vec<u32>, KvCacheFull> {
        if self.available() < count {
            return Err(KvCacheFull {
                needed: count,
                free: self.available(),
                total: self.total,
            });
        }
        let mut blocks = Vec::with_capacity(count);
        while blocks.len() < count {
            let block = match self.free.pop() {
                Some(block) => block,
                None => {
                    let (_, block) = self.evictable.pop_first().expect("counted above");
                    if let Some(hash) = self.hash_of[block as usize].take() {
                        self.by_hash.remove(&hash);
                    }
                    self.evictions += 1;
                    block
                }
            };
            self.holders[block as usize] = 1;
            blocks.push(block);
        }
        Ok(blocks)
    }

    /// One holder lets `block` go: with none left it is evictable if
    /// registered, else free.
    pub(crate) fn release(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.holders[b] > 0, "block {block} released more than held");
        self.holders[b] -= 1;
        if self.holders[b] > 0 {
            return;
        }
        if self.hash_of[b].is_some() {
            self.clock += 1;
            self.released_at[b] = self.clock;
            self.evictable.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }

    /// The registered blocks of the longest prefix of `hashes`, each now
    /// held once more.
    pub(crate) fn share(&mut self, hashes: &[BlockHash]) -> Vec<u32> {
        let mut blocks = Vec::new();
        if !self.prefix_caching {
            return blocks;
        }
        for hash in hashes {
            let Some(&block) = self.by_hash.get(hash) else {
                break;
            };
            let b = block as usize;
            if self.holders[b] == 0 {
                self.evictable.remove(&self.released_at[b]);
            }
            self.holders[b] += 1;
            blocks.push(block);
        }
        blocks
    }

    /// Registers a full `block` under `hash`, unless the hash names another
    /// block already (that one stays the cached copy) or the block has one.
    pub(crate) fn register(&mut self, block: u32, hash: BlockHash) {
        let b = block as usize;
        if !self.prefix_caching || self.hash_of[b].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.hash_of[b] = Some(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chained_hashes_tell_prefixes_apart() {
        let a = chain(None, &[1, 2, 3]);
        assert_eq!(a, chain(None, &[1, 2, 3]));
        assert_ne!(a, chain(None, &[1, 2, 4]));
        // The same tokens after different prefixes are different blocks.
        let b = chain(Some(&a), &[5, 6]);
        assert_ne!(b, chain(Some(&chain(None, &[9])), &[5, 6]));
        assert_ne!(b, chain(None, &[5, 6]));
    }

    #[test]
    fn shared_blocks_are_held_until_the_last_holder_then_evicted_oldest_first() {
        let mut pool = BlockPool::new(4); // blocks 1, 2, 3
        pool.prefix_caching = true;
        let hashes: Vec<BlockHash> = (0..3u32).map(|i| chain(None, &[i])).collect();
        let blocks = pool.take(2).unwrap();
        pool.register(blocks[0], hashes[0]);
        pool.register(blocks[1], hashes[1]);
        // A second sequence finds both (the lookup stops at the first miss).
        let shared = pool.share(&[hashes[0], hashes[1], hashes[2]]);
        assert_eq!(shared, blocks);
        assert_eq!(pool.available(), 1);
        // The first lets go: still held by the second.
        blocks.iter().for_each(|&b| pool.release(b));
        assert_eq!(pool.available(), 1);
        // The second lets go of block 1 first, then block 0: both cached,
        // evictable, and found again.
        pool.release(shared[1]);
        pool.release(shared[0]);
        assert_eq!(pool.available(), 3);
        assert_eq!(pool.cached(), 2);
        // Taking 2 takes the free block, then the least recently released.
        let taken = pool.take(2).unwrap();
        assert!(taken.contains(&shared[1]) && !taken.contains(&shared[0]));
        assert_eq!(pool.evictions, 1);
        assert_eq!(pool.share(&[hashes[0], hashes[1]]), vec![shared[0]]);
        assert!(pool.take(1).is_err(), "every block is held");
    }

    #[test]
    fn without_prefix_caching_nothing_is_registered_or_shared() {
        let mut pool = BlockPool::new(3);
        let blocks = pool.take(1).unwrap();
        pool.register(blocks[0], chain(None, &[1]));
        assert!(pool.share(&[chain(None, &[1])]).is_empty());
        pool.release(blocks[0]);
        assert_eq!((pool.available(), pool.cached()), (2, 0));
    }
}
