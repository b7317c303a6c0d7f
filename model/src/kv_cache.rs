//! The key/value cache of one sequence: per layer, keys and values of every
//! position seen so far, `[kv_heads, positions, head_dim]`.

use tch::Tensor;

#[derive(Default)]
struct LayerKv {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

pub struct KvCache {
    layers: Vec<LayerKv>,
    positions: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
            positions: 0,
        }
    }

    /// Positions already held (the position of the next token).
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Appends one layer's new keys and values and returns everything held for
    /// that layer. The last layer to append advances the position count.
    pub fn append(&mut self, layer: usize, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        let entry = &mut self.layers[layer];
        let (k, v) = match (&entry.keys, &entry.values) {
            (Some(k), Some(v)) => (Tensor::cat(&[k, keys], 1), Tensor::cat(&[v, values], 1)),
            _ => (keys.shallow_clone(), values.shallow_clone()),
        };
        entry.keys = Some(k.shallow_clone());
        entry.values = Some(v.shallow_clone());
        if layer + 1 == self.layers.len() {
            self.positions = k.size()[1] as usize;
        }
        (k, v)
    }
}

impl KvCache {
    /// Drops every position from `positions` on, in every layer: undoes a
    /// forward step that failed half-way.
    pub fn truncate(&mut self, positions: usize) {
        for entry in &mut self.layers {
            for t in [&mut entry.keys, &mut entry.values] {
                if let Some(held) = t.as_ref() {
                    let held_len = held.size()[1] as usize;
                    if positions == 0 {
                        *t = None;
                    } else if held_len > positions {
                        *t = Some(held.narrow(1, 0, positions as i64));
                    }
                }
            }
        }
        self.positions = self.positions.min(positions);
    }
}
