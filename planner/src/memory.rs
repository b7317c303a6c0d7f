//! Memory arithmetic: the bytes of the dense part, of the experts, and of the
//! KV cache, from the model's shape.

use serde::Serialize;

use crate::profile::ModelShape;

/// Fraction of a device's memory the plan fills at most; the rest is left to
/// the runtime, activations and fragmentation (vLLM's default is the same).
pub const USABLE_FRACTION: f64 = 0.9;

impl ModelShape {
    /// Parameters of one expert in one layer (w1, w2, w3).
    pub fn expert_parameters(&self) -> u64 {
        3 * (self.hidden_size * self.intermediate_size) as u64
    }

    /// Bytes of one expert in one layer.
    pub fn expert_layer_bytes(&self) -> u64 {
        self.expert_parameters() * self.dtype_bytes as u64
    }

    /// Bytes of one expert id across all layers (what a worker holding
    /// "expert e" everywhere stores).
    pub fn expert_bytes_all_layers(&self) -> u64 {
        self.expert_layer_bytes() * self.layers as u64
    }

    /// Parameters of the dense part: embeddings, lm_head (untied, as Mixtral),
    /// attention projections, norms and gates of every layer, the final norm.
    pub fn dense_parameters(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = (self.attention_heads * self.head_dim) as u64;
        let kv = (self.kv_heads * self.head_dim) as u64;
        let per_layer = h * q + 2 * h * kv + q * h + 2 * h + self.experts as u64 * h;
        2 * self.vocab_size as u64 * h + self.layers as u64 * per_layer + h
    }

    pub fn dense_bytes(&self) -> u64 {
        self.dense_parameters() * self.dtype_bytes as u64
    }

    pub fn total_parameters(&self) -> u64 {
        self.dense_parameters() + self.expert_parameters() * (self.experts * self.layers) as u64
    }

    /// KV cache bytes per token: keys and values of every layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes) as u64
    }
}

/// What one device holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceMemory {
    /// "router" or "worker N".
    pub device: String,
    /// (layer, expert) pairs held (workers).
    pub expert_slots: usize,
    pub expert_bytes: u64,
    /// The dense weights (router).
    pub dense_bytes: u64,
    /// KV cache for the target concurrency (router).
    pub kv_cache_bytes: u64,
    pub total_bytes: u64,
    pub capacity_bytes: u64,
    pub fits: bool,
}

impl DeviceMemory {
    pub fn new(
        device: String,
        expert_slots: usize,
        expert_bytes: u64,
        dense_bytes: u64,
        kv_cache_bytes: u64,
        capacity_bytes: u64,
    ) -> Self {
        let total_bytes = expert_bytes + dense_bytes + kv_cache_bytes;
        Self {
            device,
            expert_slots,
            expert_bytes,
            dense_bytes,
            kv_cache_bytes,
            total_bytes,
            capacity_bytes,
            fits: total_bytes as f64 <= capacity_bytes as f64 * USABLE_FRACTION,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::mixtral_8x7b;

    #[test]
    fn mixtral_8x7b_by_hand() {
        let m = mixtral_8x7b();
        // 3 × 4096 × 14336 per expert and layer.
        assert_eq!(m.expert_parameters(), 176_160_768);
        // × 32 layers × 2 bytes: about 11.3 GB per expert id.
        assert_eq!(m.expert_bytes_all_layers(), 11_274_289_152);
        // Embeddings and lm_head 2 × 32000 × 4096; per layer q, o 4096²,
        // k, v 4096 × 1024, two norms, a gate 8 × 4096; a final norm.
        let per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 4096 + 8 * 4096;
        assert_eq!(
            m.dense_parameters(),
            2 * 32000 * 4096 + 32 * per_layer + 4096
        );
        // 46.7 B parameters in all: 93.4 GB in bf16, more than an 80 GB GPU.
        assert_eq!(m.total_parameters(), 46_702_792_704);
        assert!(m.total_parameters() * 2 > 80_000_000_000);
        // K and V: 2 × 32 layers × 8 heads × 128 × 2 bytes = 128 KiB per token.
        assert_eq!(m.kv_bytes_per_token(), 131_072);
    }

    #[test]
    fn a_device_fits_within_the_usable_fraction() {
        let fits = DeviceMemory::new("w".into(), 1, 89, 0, 0, 100);
        assert!(fits.fits);
        let over = DeviceMemory::new("w".into(), 1, 91, 0, 0, 100);
        assert!(!over.fits);
        assert_eq!(over.total_bytes, 91);
    }
}
