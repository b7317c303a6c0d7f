//! The random weights: drawn tensor by tensor from one seeded stream in the
//! order `ModelSpec::tensors_layer_by_layer` lists them, edited for
//! `--expert-skew`, written as safetensors (one file, or shards and an index).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::View;
use serde_json::json;
use tch::{Kind, Tensor};
use tramontane_config::{Dtype, ModelSpec, TensorRole};

use crate::{Result, ensure, io};

/// The spread of the norms' scales about 1 and of the biases about 0: far
/// enough that a model ignoring one gives other logits.
const NORM_SPREAD: f64 = 0.1;
const BIAS_STD: f64 = 0.1;

/// A random tensor for `role` and `shape`: about unit-variance activations
/// at every layer, so logits are well spread and greedy choices are not
/// near-ties. Embeddings N(0, 1); RMSNorm scales 1 + 0.1·N(0, 1); biases
/// 0.1·N(0, 1); sinks (logits) N(0, 1); every other weight `[out, in]`
/// (or a fused expert weight `[experts, in, out]`) N(0, 1/in).
fn draw(role: TensorRole, shape: &[i64]) -> Tensor {
    let t = Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
    match (role, shape) {
        (TensorRole::Embeddings, _) => t * 1.0,
        (TensorRole::Norm | TensorRole::FeedForwardNorm, _) => t * NORM_SPREAD + 1.0,
        (TensorRole::Sinks, _) => t,
        (_, [_]) | (TensorRole::Experts { .. }, [_, _]) => t * BIAS_STD,
        (_, [_, fan_in, ..]) => t * (1.0 / (*fan_in as f64).sqrt()),
        (_, []) => t,
    }
}

/// Expert ids hottest first under `--expert-skew`: sorted by their bits read
/// from the lowest (e mod 2, then e mod 4, ...), so that worker 0 of the
/// default placement (e mod W, W a power of two) gets the hottest ones.
pub fn popularity_order(experts: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = (0..experts).collect();
    ids.sort_by_key(|e| e.reverse_bits());
    ids
}

/// Typical RMS of the residual stream (without the bias feature) at layer
/// `layer`'s router. The embeddings give about 1 and each layer's attention
/// and experts add to it: measured on these random weights (Mixtral's tiny
/// and bench, pseudo-random prompts), it grows by about 0.16 per layer,
/// 1.06 at layer 0 and 2.17 at layer 7. The gate's bias is scaled by it so
/// that the skew is about the same in every layer.
fn residual_rms(layer: usize) -> f64 {
    1.06 + 0.16 * layer as f64
}

/// Edits the random weights so that the routers prefer experts in
/// [`popularity_order`] (see the crate docs).
pub(crate) struct Skew {
    exponent: f64,
    /// The hidden coordinate holding the constant bias feature.
    channel: i64,
}

impl Skew {
    pub(crate) fn new(spec: &ModelSpec, exponent: f64) -> Self {
        Self {
            exponent,
            channel: spec.hidden_size as i64 - 1,
        }
    }

    /// `t`, a tensor of `role`, edited: the stream carries 1 in the bias
    /// channel from the embeddings on, nothing writes to it or reads it but
    /// the routers' gates, which read it as their bias.
    fn apply(&self, role: TensorRole, t: Tensor) -> Tensor {
        let j = self.channel;
        match role {
            TensorRole::Embeddings => {
                let _ = t.narrow(1, j, 1).fill_(1.0);
            }
            // A weight's column; a bias of q, k or v reads nothing.
            TensorRole::Reads if t.dim() == 2 => {
                let _ = t.narrow(1, j, 1).fill_(0.0);
            }
            // A weight's row, a bias's element.
            TensorRole::Writes => {
                let _ = t.narrow(0, j, 1).fill_(0.0);
            }
            TensorRole::FeedForwardNorm => {
                let _ = t.narrow(0, j, 1).fill_(1.0);
            }
            TensorRole::RouterGate { layer } => {
                let experts = t.size()[0] as usize;
                let mut rank = vec![0; experts];
                for (r, e) in popularity_order(experts).into_iter().enumerate() {
                    rank[e] = r;
                }
                // The feature reaches the gate as 1 / rms(x) and the logits'
                // token-dependent part spreads as rms_perp(x) / rms(x).
                let bias: Vec<f32> = rank
                    .iter()
                    .map(|&r| (-self.exponent * (1.0 + r as f64).ln() * residual_rms(layer)) as f32)
                    .collect();
                let column = Tensor::from_slice(&bias).view([bias.len() as i64, 1]);
                t.narrow(1, j, 1).copy_(&column);
            }
            // The fused experts' weights `[experts, in, out]`: a gate/up
            // weight's input row, a down weight's or bias's output column.
            TensorRole::Experts { writes: false } if t.dim() == 3 => {
                let _ = t.narrow(1, j, 1).fill_(0.0);
            }
            TensorRole::Experts { writes: true } => {
                let _ = t.narrow(t.dim() as i64 - 1, j, 1).fill_(0.0);
            }
            TensorRole::Reads
            | TensorRole::Norm
            | TensorRole::Inner
            | TensorRole::GateCorrection
            | TensorRole::RouterBias
            | TensorRole::Sinks
            | TensorRole::Experts { .. } => {}
        }
        t
    }
}

/// A tensor's bytes ready for the safetensors writer.
struct StoredTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &StoredTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn stored(tensor: &Tensor, dtype: Dtype) -> StoredTensor {
    let (kind, stored) = match dtype {
        Dtype::F32 => (Kind::Float, safetensors::Dtype::F32),
        Dtype::Bf16 => (Kind::BFloat16, safetensors::Dtype::BF16),
        Dtype::F16 => (Kind::Half, safetensors::Dtype::F16),
    };
    let t = tensor.to_kind(kind).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.bytes()];
    t.copy_data_u8(&mut bytes, numel);
    StoredTensor {
        dtype: stored,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    }
}

/// How the weights are stored: in `dtype`, the fused experts' weights in
/// MXFP4 where `mxfp4`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stored {
    pub dtype: Dtype,
    pub mxfp4: bool,
}

/// The E2M1 magnitudes, by their 3 low bits.
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// `w` `[experts, in, out]` in MXFP4 as gpt-oss checkpoints store it,
/// output-major: blocks `[experts, out, in / 32, 16]` (two E2M1 values a
/// byte, the low nibble first) and scales `[experts, out, in / 32]` (E8M0:
/// the exponent + 127). Each block of 32 takes the smallest power of two
/// that brings its largest magnitude within 6, E2M1's largest; each value
/// rounds to the nearest E2M1 value (ties to the smaller magnitude).
pub(crate) fn mxfp4(w: &Tensor) -> (Tensor, Tensor) {
    let size = w.size();
    let (experts, inner, outputs) = (size[0], size[1], size[2]);
    let groups = inner / 32;
    let w = w
        .to_kind(Kind::Float)
        .transpose(1, 2)
        .contiguous()
        .view([experts, outputs, groups, 32]);
    let largest = w.abs().amax(-1, true);
    let exponent = (largest / 6.0)
        .clamp_min(f64::from(f32::MIN_POSITIVE))
        .log2()
        .ceil()
        .clamp(-127.0, 127.0);
    let scaled = &w / exponent.exp2();
    let table = Tensor::from_slice(&E2M1);
    let index = (scaled.abs().unsqueeze(-1) - &table)
        .abs()
        .argmin(-1, false);
    let sign = scaled.lt(0.0).to_kind(Kind::Int64) * 8;
    let codes = (index + sign).view([experts, outputs, groups, 16, 2]);
    let blocks = (codes.select(-1, 0) + codes.select(-1, 1) * 16).to_kind(Kind::Uint8);
    let scales = (exponent.squeeze_dim(-1) + 127.0).to_kind(Kind::Uint8);
    (blocks, scales)
}

/// Bytes (`Uint8`) as stored.
fn stored_bytes(tensor: &Tensor) -> StoredTensor {
    let t = tensor.contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel];
    t.copy_data_u8(&mut bytes, numel);
    StoredTensor {
        dtype: safetensors::Dtype::U8,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    }
}

/// Draws the weights of `spec` under `seed` and writes them into `out`
/// (replacing any there), in `shards` files.
pub(crate) fn write_weights(
    out: &Path,
    spec: &ModelSpec,
    Stored {
        dtype,
        mxfp4: as_mxfp4,
    }: Stored,
    seed: u64,
    shards: usize,
    skew: Option<&Skew>,
) -> Result<()> {
    let _guard = tch::no_grad_guard();
    // The weights come from libtorch's process-wide generator: the seed and
    // every draw are taken under one lock, so that checkpoints written at
    // once from several threads each get their own seed's weights.
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let drawing = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    let tensors: Vec<(String, StoredTensor)> = spec
        .tensors_layer_by_layer()
        .into_iter()
        .flat_map(|(tensor, role)| {
            let shape: Vec<i64> = tensor.shape.iter().map(|&d| d as i64).collect();
            let t = draw(role, &shape);
            // After the draw: the random stream, and so every value the skew
            // leaves alone, is the same as without it.
            let t = match skew {
                Some(skew) => skew.apply(role, t),
                None => t,
            };
            if as_mxfp4 && matches!(role, TensorRole::Experts { .. }) && t.dim() == 3 {
                let (blocks, scales) = mxfp4(&t);
                return vec![
                    (format!("{}_blocks", tensor.name), stored_bytes(&blocks)),
                    (format!("{}_scales", tensor.name), stored_bytes(&scales)),
                ];
            }
            vec![(tensor.name, stored(&t, dtype))]
        })
        .collect();
    drop(drawing);
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    for stale in std::fs::read_dir(out).map_err(io(out))? {
        let path = stale.map_err(io(out))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("model")
            && (name.ends_with(".safetensors") || name.ends_with(".index.json"))
        {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    if shards == 1 {
        let views: Vec<(&str, &StoredTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        return serialize(views, metadata, &out.join("model.safetensors"));
    }
    // Contiguous groups of about equal tensor count, like HF's sharded layout
    // (embeddings first, lm_head last).
    ensure(shards <= tensors.len(), || {
        format!(
            "--shards {shards} is more than the {} tensors of this checkpoint",
            tensors.len()
        )
    })?;
    let total: usize = tensors.iter().map(|(_, t)| t.bytes.len()).sum();
    let groups: Vec<&[(String, StoredTensor)]> = (0..shards)
        .map(|i| &tensors[i * tensors.len() / shards..(i + 1) * tensors.len() / shards])
        .collect();
    let mut weight_map = BTreeMap::new();
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        let views: Vec<(&str, &StoredTensor)> =
            group.iter().map(|(n, t)| (n.as_str(), t)).collect();
        serialize(views, metadata.clone(), &out.join(&file))?;
        for (name, _) in group.iter() {
            weight_map.insert(name.clone(), file.clone());
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = out.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).expect("JSON values serialise");
    std::fs::write(&path, text).map_err(io(&path))
}

/// Writes `views` to `file` in safetensors. safetensors writes through a
/// temporary file, which is created with mode 0600; the weights get the
/// mode every other file of the checkpoint gets (0666 less the umask), so
/// that a server running as another user (a container's) reads them as it
/// reads a downloaded checkpoint.
fn serialize(
    views: Vec<(&str, &StoredTensor)>,
    metadata: Option<std::collections::HashMap<String, String>>,
    file: &Path,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    safetensors::serialize_to_file(views, metadata, file)?;
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
        })
        .unwrap_or(0o022);
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o666 & !umask))
        .map_err(io(file))
}

#[cfg(test)]
mod tests {
    use tramontane_config::Family;

    use super::*;
    use crate::{Preset, Spec};

    /// The weights are written with the mode the index (written as any
    /// file) gets, not the 0600 of safetensors' temporary file: a server
    /// running as another user reads them.
    #[test]
    fn weights_get_the_mode_of_the_checkpoints_other_files() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let spec = Spec::family(Family::Mixtral, Preset::Tiny);
        let (_, model) = spec.config()?;
        let stored = Stored {
            dtype: Dtype::F32,
            mxfp4: false,
        };
        let mode = |path: &Path| -> anyhow::Result<u32> {
            Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
        };
        write_weights(dir.path(), &model, stored, 0, 2, None)?;
        let index = mode(&dir.path().join("model.safetensors.index.json"))?;
        assert_ne!(index & 0o044, 0, "{index:o}");
        for shard in ["model-00001-of-00002", "model-00002-of-00002"] {
            let path = dir.path().join(format!("{shard}.safetensors"));
            assert_eq!(mode(&path)?, index, "{}", path.display());
        }
        write_weights(dir.path(), &model, stored, 0, 1, None)?;
        assert_eq!(mode(&dir.path().join("model.safetensors"))?, index);
        Ok(())
    }

    /// Every tensor of every family as drawn: a norm's scale away from 1, a
    /// bias away from 0, each tensor in the checkpoint with its shape.
    #[test]
    fn every_norm_and_bias_is_drawn_away_from_its_init() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let specs = [
            Spec::family(Family::Mixtral, Preset::Tiny),
            Spec {
                attention_bias: Some(true),
                layers: Some(3),
                dense_layers: Some(vec![1]),
                ..Spec::family(Family::Qwen3Moe, Preset::Tiny)
            },
            Spec::family(Family::Qwen2Moe, Preset::Tiny),
            Spec {
                attention_bias: Some(true),
                ..Spec::family(Family::Olmoe, Preset::Tiny)
            },
            Spec::family(Family::GptOss, Preset::Tiny),
        ];
        for spec in specs {
            let (_, model) = spec.config()?;
            let out = dir.path().join(spec.family.model_type());
            std::fs::create_dir_all(&out)?;
            let stored = Stored {
                dtype: Dtype::F32,
                mxfp4: false,
            };
            write_weights(&out, &model, stored, 0, 1, None)?;
            let stored: BTreeMap<String, Tensor> =
                Tensor::read_safetensors(out.join("model.safetensors"))?
                    .into_iter()
                    .collect();
            let listed = model.tensors_layer_by_layer();
            assert_eq!(stored.len(), listed.len());
            let (mut norms, mut biases) = (0, 0);
            for (tensor, role) in listed {
                let t = &stored[&tensor.name];
                let shape: Vec<i64> = tensor.shape.iter().map(|&d| d as i64).collect();
                assert_eq!(t.size(), shape, "{}", tensor.name);
                let spread = |about: f64| (t - about).abs().mean(Kind::Float).double_value(&[]);
                match (role, tensor.shape.len()) {
                    (TensorRole::Norm | TensorRole::FeedForwardNorm, _) => {
                        norms += 1;
                        assert!(spread(1.0) > 0.05, "{} is about 1", tensor.name);
                    }
                    (_, 1) => {
                        biases += 1;
                        assert!(spread(0.0) > 0.05, "{} is about 0", tensor.name);
                    }
                    _ => assert!(spread(0.0) > 0.01, "{} is about 0", tensor.name),
                }
            }
            let a = &model.attention;
            eprintln!("{:?}: {norms} norms, {biases} biases", spec.family);
            assert!(norms > 2 * model.layers.len());
            assert_eq!(biases > 0, a.qkv_bias || a.o_bias);
        }
        Ok(())
    }
}
