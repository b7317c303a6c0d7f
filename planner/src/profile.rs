//! A device profile: what a step costs on one kind of device, as tables of
//! (size, seconds) points the simulation interpolates. `tramontane profile`
//! measures one on a real device for one model; [`crate::roofline`] estimates
//! one from a datasheet for any model.
//!
//! File format (JSON), `format: "tramontane-profile-v1"`: see [`Profile`].

use std::path::Path;

use serde::{Deserialize, Serialize};
use tramontane_config::{FfnSpec, ModelSpec, MoeSpec};

use crate::model::SizedModel;
use crate::weight_dtype::WeightDtype;

pub const FORMAT: &str = "tramontane-profile-v1";

/// The shape of the model a profile was made for: a measured profile only
/// predicts the model it was measured on. The fields a Mixtral has not
/// (dense layers, a shared expert) are left out of the file when absent,
/// so profiles measured before them still name their model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub hidden_size: usize,
    /// Each routed expert's SwiGLU width (Mixtral's `intermediate_size`,
    /// the Qwen families' `moe_intermediate_size`).
    pub intermediate_size: usize,
    /// Decoder layers, dense or not.
    pub layers: usize,
    /// Routed experts of an MoE layer, and how many a token takes.
    pub experts: usize,
    pub top_k: usize,
    pub attention_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Bytes of one weight or activation element (4 for f32, 2 for bf16).
    pub dtype_bytes: usize,
    /// The decoder layers with a dense MLP instead of routed experts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense_layers: Vec<usize>,
    /// Their MLP's width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dense_width: Option<usize>,
    /// The width of the expert every token takes beside its routed ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_expert_width: Option<usize>,
    /// How the routed experts' weights are held where quantized (`int8`,
    /// ...; otherwise in the compute dtype): a measured profile times them
    /// as they were held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_weights: Option<WeightDtype>,
}

impl ModelShape {
    /// The shape of `spec` in elements of `dtype_bytes` bytes. Where MoE
    /// layers differ (no family's do), the largest.
    pub fn new(spec: &ModelSpec, dtype_bytes: usize) -> Self {
        let largest =
            |of: fn(&MoeSpec) -> Option<usize>| spec.moe_layers().filter_map(|(_, m)| of(m)).max();
        let dense: Vec<(usize, usize)> = spec
            .layers
            .iter()
            .enumerate()
            .filter_map(|(layer, ffn)| match ffn {
                FfnSpec::Dense { width } => Some((layer, *width)),
                FfnSpec::Moe(_) => None,
            })
            .collect();
        Self {
            hidden_size: spec.hidden_size,
            intermediate_size: largest(|m| Some(m.width)).unwrap_or(0),
            layers: spec.layers.len(),
            experts: spec.max_experts(),
            top_k: spec.max_top_k(),
            attention_heads: spec.attention.heads,
            kv_heads: spec.attention.kv_heads,
            head_dim: spec.attention.head_dim,
            vocab_size: spec.vocab_size,
            dtype_bytes,
            dense_layers: dense.iter().map(|&(layer, _)| layer).collect(),
            dense_width: dense.iter().map(|&(_, width)| width).max(),
            shared_expert_width: largest(|m| m.shared.map(|s| s.width)),
            expert_weights: None,
        }
    }

    /// The same shape, the routed experts held as `weights` (recorded where
    /// quantized).
    pub fn with_expert_weights(self, weights: WeightDtype) -> Self {
        Self {
            expert_weights: weights.quantized().then_some(weights),
            ..self
        }
    }
}

/// One measured or estimated cost: `seconds` at size `x` (rows, tokens or bytes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub x: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub format: String,
    /// What was profiled, in words (e.g. "cpu, 2 cores" or "NVIDIA H100 SXM").
    pub device: String,
    /// True for datasheet estimates, false for measurements.
    pub estimate: bool,
    /// How the figures were obtained, in words.
    pub source: String,
    /// Memory of one device, bytes.
    pub memory_bytes: u64,
    /// Workers that can compute at once when every worker shares one host
    /// (CPU workers on one machine: cores ÷ threads per worker); absent when
    /// each worker has a device of its own.
    #[serde(default)]
    pub shared_lanes: Option<usize>,
    pub model: ModelShape,
    /// One expert's FFN (w1, w3, SiLU, w2) against the rows it computes.
    pub expert_ffn: Vec<Point>,
    /// The dense part of a step but lm_head (embeddings, attention
    /// projections, norms, gates, every layer) against the tokens of the
    /// step, without the attention over context and the per-sequence cost.
    pub dense_step: Vec<Point>,
    /// Each sequence of a step: its own attention calls and cache update.
    #[serde(default)]
    pub per_sequence: f64,
    /// The final norm and lm_head against the rows they compute: one per
    /// sequence of the step (the last position of each).
    pub lm_head: Vec<Point>,
    /// Attention compute: seconds per (new token × token attended to),
    /// summed over layers.
    pub attention_per_token_pair: f64,
    /// Attention memory traffic: seconds per cached token read, summed over
    /// layers (each sequence of a step reads its cache once).
    #[serde(default)]
    pub attention_per_context_token: f64,
    /// One Forward round trip to a worker beyond its expert compute (gRPC,
    /// serialization, gather and scatter) against the bytes sent and returned.
    pub dispatch: Vec<Point>,
    /// On a shared host (`shared_lanes`), `expert_ffn` and `dispatch` are
    /// measured with every lane busy, as when serving; a worker computing
    /// alone takes this fraction of that (1 where workers do not share).
    #[serde(default = "one")]
    pub alone_factor: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read profile {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("profile {path}: format {found:?}, expected {FORMAT:?}")]
    Format { path: String, found: String },
    #[error("profile: table {table} {reason}")]
    Table { table: &'static str, reason: String },
    #[error(
        "the profile was made for another model ({profiled}); the plan is for {planned}: measure this model with `tramontane profile`, or use a built-in profile (h100, h200, a100)"
    )]
    OtherModel { profiled: String, planned: String },
    #[error("--profile {spec:?}: neither a built-in profile ({builtins}) nor a file")]
    Unknown { spec: String, builtins: String },
}

impl Profile {
    /// A built-in profile by name (`h100`, ...) made for `model`, or a
    /// measured profile file, checked to be for `model`.
    pub fn load(spec: &str, model: &SizedModel) -> Result<Self, ProfileError> {
        if let Some(gpu) = crate::roofline::by_key(spec) {
            return Ok(gpu.profile(model));
        }
        let path = Path::new(spec);
        if !path.exists() {
            return Err(ProfileError::Unknown {
                spec: spec.into(),
                builtins: crate::roofline::GPUS.map(|g| g.key).join(", "),
            });
        }
        let profile = Profile::from_file(path)?;
        profile.check_model(&model.shape())?;
        Ok(profile)
    }

    pub fn from_file(path: &Path) -> Result<Self, ProfileError> {
        let read_err = |reason: String| ProfileError::Read {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
        let profile: Profile = serde_json::from_str(&text).map_err(|e| read_err(e.to_string()))?;
        if profile.format != FORMAT {
            return Err(ProfileError::Format {
                path: path.display().to_string(),
                found: profile.format,
            });
        }
        profile.validate()?;
        Ok(profile)
    }

    /// Every table has points with finite, non-negative values, in increasing x.
    pub fn validate(&self) -> Result<(), ProfileError> {
        for (table, points) in [
            ("expert_ffn", &self.expert_ffn),
            ("dense_step", &self.dense_step),
            ("lm_head", &self.lm_head),
            ("dispatch", &self.dispatch),
        ] {
            let err = |reason: &str| ProfileError::Table {
                table,
                reason: reason.into(),
            };
            if points.is_empty() {
                return Err(err("is empty"));
            }
            if points.iter().any(|p| {
                !(p.x.is_finite() && p.seconds.is_finite() && p.x >= 0.0 && p.seconds >= 0.0)
            }) {
                return Err(err("has a negative or non-finite value"));
            }
            if points.windows(2).any(|w| w[1].x <= w[0].x) {
                return Err(err("is not in increasing x"));
            }
        }
        for (table, value) in [
            ("alone_factor", self.alone_factor),
            ("per_sequence", self.per_sequence),
            ("attention_per_token_pair", self.attention_per_token_pair),
            (
                "attention_per_context_token",
                self.attention_per_context_token,
            ),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(ProfileError::Table {
                    table,
                    reason: "must be finite and non-negative".into(),
                });
            }
        }
        Ok(())
    }

    /// A measured profile only predicts the model it was measured on.
    pub fn check_model(&self, planned: &ModelShape) -> Result<(), ProfileError> {
        if &self.model == planned {
            return Ok(());
        }
        let describe = |m: &ModelShape| {
            let mut text = format!(
                "hidden {}, intermediate {}, {} layers, {} experts top-{}, {} bytes per element",
                m.hidden_size, m.intermediate_size, m.layers, m.experts, m.top_k, m.dtype_bytes
            );
            if !m.dense_layers.is_empty() {
                text += &format!(", dense layers {:?}", m.dense_layers);
            }
            if let Some(width) = m.shared_expert_width {
                text += &format!(", a shared expert of width {width}");
            }
            if let Some(weights) = m.expert_weights {
                text += &format!(", experts held in {weights}");
            }
            text
        };
        Err(ProfileError::OtherModel {
            profiled: describe(&self.model),
            planned: describe(planned),
        })
    }

    pub fn expert_seconds(&self, rows: usize) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        interpolate(&self.expert_ffn, rows as f64)
    }

    /// The dense part of a step: `slices` gives, per sequence, the new
    /// tokens and the tokens already in its cache.
    pub fn dense_seconds(&self, slices: impl Iterator<Item = (usize, usize)>) -> f64 {
        let (mut tokens, mut sequences, mut pairs, mut read) = (0usize, 0usize, 0.0, 0usize);
        for (new, cached) in slices {
            tokens += new;
            sequences += 1;
            pairs += attention_pairs(new, cached);
            read += cached + new;
        }
        if sequences == 0 {
            return 0.0;
        }
        interpolate(&self.dense_step, tokens as f64)
            + self.per_sequence * sequences as f64
            + interpolate(&self.lm_head, sequences as f64)
            + self.attention_per_token_pair * pairs
            + self.attention_per_context_token * read as f64
    }

    pub fn dispatch_seconds(&self, bytes: usize) -> f64 {
        interpolate(&self.dispatch, bytes as f64)
    }
}

/// (new token × token attended to) pairs of causal attention for `new`
/// tokens after `cached` ones.
pub fn attention_pairs(new: usize, cached: usize) -> f64 {
    let new = new as f64;
    new * cached as f64 + new * (new + 1.0) / 2.0
}

/// Piecewise linear through the points; beyond the last point along the last
/// segment's slope (never decreasing), below the first point its value.
pub fn interpolate(points: &[Point], x: f64) -> f64 {
    let first = points[0];
    if x <= first.x || points.len() == 1 {
        return if points.len() == 1 && x > first.x && first.x > 0.0 {
            first.seconds * x / first.x
        } else {
            first.seconds
        };
    }
    for w in points.windows(2) {
        if x <= w[1].x {
            let t = (x - w[0].x) / (w[1].x - w[0].x);
            return w[0].seconds + t * (w[1].seconds - w[0].seconds);
        }
    }
    let [a, b] = [points[points.len() - 2], points[points.len() - 1]];
    let slope = ((b.seconds - a.seconds) / (b.x - a.x)).max(0.0);
    b.seconds + slope * (x - b.x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(x: f64, seconds: f64) -> Point {
        Point { x, seconds }
    }

    #[test]
    fn a_mixtral_profile_of_before_dense_layers_still_names_its_model() {
        // A shape as measured profiles wrote it before dense layers and
        // shared experts: it is Mixtral-8x7B's.
        let written = r#"{"hidden_size": 4096, "intermediate_size": 14336, "layers": 32,
            "experts": 8, "top_k": 2, "attention_heads": 32, "kv_heads": 8, "head_dim": 128,
            "vocab_size": 32000, "dtype_bytes": 2}"#;
        let read: ModelShape = serde_json::from_str(written).unwrap();
        let mixtral = crate::test_fixtures::fixture("mixtral-8x7b").shape();
        assert_eq!(read, mixtral);
        let text = serde_json::to_string(&mixtral).unwrap();
        assert!(
            !text.contains("dense") && !text.contains("shared"),
            "{text}"
        );
    }

    #[test]
    fn a_shape_tells_the_families_apart() {
        let qwen3 = crate::test_fixtures::fixture("qwen3-30b-a3b").shape();
        // The routed experts' width, not the dense MLP's intermediate_size.
        assert_eq!(
            (qwen3.intermediate_size, qwen3.experts, qwen3.top_k),
            (768, 128, 8)
        );
        assert_eq!((qwen3.head_dim, qwen3.layers), (128, 48));
        let qwen2 = crate::test_fixtures::fixture("qwen2-57b-a14b").shape();
        assert_eq!(qwen2.shared_expert_width, Some(20480));
        let dense = crate::test_fixtures::with_dense_layers(3, 4, 2, &[1], 24).shape();
        assert_eq!((dense.dense_layers, dense.dense_width), (vec![1], Some(24)));
        // A profile measured on another family's model is refused.
        let profile = crate::test_fixtures::profile(
            &crate::test_fixtures::fixture("qwen2-57b-a14b"),
            0.0,
            0.0,
            0.0,
        );
        let mut other = qwen2.clone();
        other.shared_expert_width = None;
        let err = profile.check_model(&other).unwrap_err().to_string();
        assert!(err.contains("a shared expert of width 20480"), "{err}");
    }

    #[test]
    fn interpolation_is_piecewise_linear_and_extrapolates_the_last_slope() {
        let table = [p(1.0, 1.0), p(3.0, 2.0), p(5.0, 6.0)];
        assert_eq!(interpolate(&table, 0.5), 1.0);
        assert_eq!(interpolate(&table, 2.0), 1.5);
        assert_eq!(interpolate(&table, 4.0), 4.0);
        assert_eq!(interpolate(&table, 7.0), 10.0);
        // A falling last segment does not predict negative costs.
        let falling = [p(1.0, 2.0), p(2.0, 1.0)];
        assert_eq!(interpolate(&falling, 10.0), 1.0);
        // One point: proportional above it.
        assert_eq!(interpolate(&[p(2.0, 4.0)], 4.0), 8.0);
    }
}
