//! One SwiGLU feed-forward `w2(silu(w1·x) ⊙ w3·x)` (w1 the gate, w3 the up
//! and w2 the down projection): a routed expert (HF
//! `MixtralBlockSparseTop2MLP`, `Qwen3MoeMLP`, ...), a shared expert or a
//! dense layer's MLP. The gate and up projections are laid out at
//! load for the kernel that reads them: stacked (w1 above w3, one matmul)
//! for the reduced-precision dtypes, where oneDNN's kernels gain from the
//! larger matrix, and apart in f32, where MKL repacks the weight matrix on
//! every small-batch call and two halves pack faster than one whole
//! (measured on the `bench` model's shapes, batch rows 4 to 32).
//! gpt-oss's experts add biases to their projections and clamp their
//! SwiGLU ([`Activation::ClampedSwiGlu`]); they are stored fused, every
//! expert of a layer in one tensor per projection (in MXFP4 as released),
//! and each is cut out of them at load ([`Expert::load_fused`]).

use tch::{Device, Kind, TchError, Tensor};

use crate::error::{ForwardError, WeightsError};
use crate::projection;
use crate::weight_matrix::{MatrixRef, WeightMatrix};
use crate::weights::Checkpoint;
use tramontane_config::{Activation, ExpertTensors, FusedExperts, Quantization};

pub struct Expert {
    gate_up: GateUp,
    /// `[hidden, intermediate]`
    w2: WeightMatrix,
    /// The gate's and the up projection's biases side by side `[2 ×
    /// intermediate]`, and the down projection's `[hidden]` (gpt-oss).
    biases: Option<[Tensor; 2]>,
    activation: Activation,
}

enum GateUp {
    /// w1 above w3: `[2 * intermediate, hidden]`.
    Stacked {
        w13: WeightMatrix,
        intermediate: i64,
    },
    /// w1 and w3, `[intermediate, hidden]` each (plain f32).
    Apart { w1: WeightMatrix, w3: WeightMatrix },
}

impl Expert {
    /// An expert from its weights: w1, w3 `[intermediate, hidden]`, w2 `[hidden, intermediate]`.
    pub fn new(w1: Tensor, w2: Tensor, w3: Tensor) -> Self {
        Self::from_matrices(
            WeightMatrix::Plain(w1),
            WeightMatrix::Plain(w2),
            WeightMatrix::Plain(w3),
        )
        .expect("plain matrices stack")
    }

    /// An expert from its weights as held (stored alike), w1 and w3 stacked
    /// unless plain f32 or FP8.
    pub fn from_matrices(
        w1: WeightMatrix,
        w2: WeightMatrix,
        w3: WeightMatrix,
    ) -> Result<Self, TchError> {
        let gate_up = match &w1 {
            WeightMatrix::Plain(w) if w.kind() == Kind::Float => GateUp::Apart { w1, w3 },
            w if !w.stacks() => GateUp::Apart { w1, w3 },
            _ => GateUp::Stacked {
                intermediate: w1.size()[0],
                w13: WeightMatrix::stack(&w1, &w3)?,
            },
        };
        Ok(Self {
            gate_up,
            w2,
            biases: None,
            activation: Activation::SwiGlu,
        })
    }

    /// The expert with these biases (the gate's and up projection's side
    /// by side, the down projection's) and this activation.
    pub fn with_biases(mut self, biases: Option<[Tensor; 2]>, activation: Activation) -> Self {
        self.biases = biases;
        self.activation = activation;
        self
    }

    /// Whether the expert is a plain SwiGLU without biases.
    fn plain_swiglu(&self) -> bool {
        self.biases.is_none() && self.activation == Activation::SwiGlu
    }

    /// The gate's and up projection's biases, and the down projection's.
    pub fn biases(&self) -> Option<[&Tensor; 2]> {
        self.biases.as_ref().map(|[gate_up, down]| [gate_up, down])
    }

    pub fn activation(&self) -> Activation {
        self.activation
    }

    /// Expert `expert` of the `experts` of a layer stored fused (gpt-oss;
    /// see [`FusedExperts`]), `hidden` rows in and out and `width` in
    /// between: MXFP4 weights held as stored, others in `kind` (quantized
    /// where `quantization` says); the gate's and up projection's rows
    /// de-interleaved; biases in `kind`.
    pub fn load_fused(
        checkpoint: &Checkpoint,
        names: &FusedExperts,
        (expert, experts): (usize, usize),
        (hidden, width): (usize, usize),
        (kind, quantization): (Kind, Option<Quantization>),
        activation: Activation,
        device: Device,
    ) -> Result<Self, WeightsError> {
        let (h, i) = (hidden as i64, width as i64);
        let entry = (expert, experts);
        let torch = |key: &str| {
            let key = key.to_string();
            move |error| WeightsError::Torch { key, error }
        };
        let (gate_up, w2) = if checkpoint.mxfp4() {
            (
                checkpoint.load_mxfp4_entry(&names.gate_up, entry, [2 * i, h], device)?,
                checkpoint.load_mxfp4_entry(&names.down, entry, [h, i], device)?,
            )
        } else {
            let read_as = if quantization.is_some() {
                Kind::Float
            } else {
                kind
            };
            // Stored input-major: `[hidden, 2 × width]` and `[width, hidden]`.
            let output_major = |name: &str, rest: [i64; 2]| -> Result<WeightMatrix, WeightsError> {
                let w = checkpoint.load_entry(name, entry, &rest, device)?;
                let w = w
                    .f_to_kind(read_as)
                    .and_then(|w| w.f_transpose(0, 1)?.f_contiguous())
                    .map_err(torch(name))?;
                WeightMatrix::new(w, quantization).map_err(torch(name))
            };
            (
                output_major(&names.gate_up, [h, 2 * i])?,
                output_major(&names.down, [i, h])?,
            )
        };
        let split = |start| {
            gate_up
                .every_nth_row(start, 2)
                .map_err(torch(&names.gate_up))
        };
        let (w1, w3) = (split(0)?, split(1)?);
        let bias = |name: &str, len: i64| -> Result<Tensor, WeightsError> {
            checkpoint
                .load_entry(name, entry, &[len], device)?
                .f_to_kind(kind)
                .map_err(torch(name))
        };
        let gate_up_bias = bias(&names.gate_up_bias, 2 * i)?;
        let gate_up_bias = Tensor::f_cat(
            &[
                gate_up_bias
                    .f_slice(0, 0, None, 2)
                    .map_err(torch(&names.gate_up_bias))?,
                gate_up_bias
                    .f_slice(0, 1, None, 2)
                    .map_err(torch(&names.gate_up_bias))?,
            ],
            0,
        )
        .map_err(torch(&names.gate_up_bias))?;
        let down_bias = bias(&names.down_bias, h)?;
        Ok(Self::from_matrices(w1, w2, w3)
            .map_err(torch(&names.gate_up))?
            .with_biases(Some([gate_up_bias, down_bias]), activation))
    }

    /// The projections named `names`, of `hidden` rows in and out and
    /// `width` in between, as [`Checkpoint::load_matrix`] holds them (FP8
    /// as stored; else in `kind`, quantized where `quantization` says).
    pub fn load(
        checkpoint: &Checkpoint,
        names: &ExpertTensors,
        (hidden, width): (usize, usize),
        precision: (Kind, Option<Quantization>),
        device: Device,
    ) -> Result<Self, WeightsError> {
        let (h, i) = (hidden as i64, width as i64);
        let load = |name: &str, shape: [i64; 2]| -> Result<WeightMatrix, WeightsError> {
            checkpoint.load_matrix(name, shape, precision, device)
        };
        let (w1, w2, w3) = (
            load(&names.gate, [i, h])?,
            load(&names.down, [h, i])?,
            load(&names.up, [i, h])?,
        );
        Self::from_matrices(w1, w2, w3).map_err(|error| WeightsError::Torch {
            key: names.gate.clone(),
            error,
        })
    }

    /// Bytes held by the expert's matrices and biases, and the matrices'
    /// dtype's name.
    pub fn bytes(&self) -> (u64, &'static str) {
        let (gate_up, name) = match &self.gate_up {
            GateUp::Stacked { w13, .. } => (w13.bytes(), w13.dtype_name()),
            GateUp::Apart { w1, w3 } => (w1.bytes() + w3.bytes(), w1.dtype_name()),
        };
        let biases: u64 = self
            .biases
            .iter()
            .flatten()
            .map(|b| (b.numel() * b.kind().elt_size_in_bytes()) as u64)
            .sum();
        (gate_up + self.w2.bytes() + biases, name)
    }

    /// w1, w3 `[intermediate, hidden]` (views of the stacked matrix) and w2
    /// `[hidden, intermediate]`, as held.
    pub fn matrices(&self) -> Result<[WeightMatrix; 3], TchError> {
        let (w1, w3) = self.gate_and_up()?;
        Ok([w1, w3, self.w2.shallow_clone()])
    }

    /// w1, w3 and w2 as libtorch takes them for activations of `kind`
    /// (see [`MatrixRef::dequantize`]).
    pub fn weights(&self, kind: Kind) -> Result<[Tensor; 3], TchError> {
        let [w1, w3, w2] = self.matrices()?;
        Ok([
            w1.as_ref().dequantize(kind)?,
            w3.as_ref().dequantize(kind)?,
            w2.as_ref().dequantize(kind)?,
        ])
    }

    /// w1 and w3, `[intermediate, hidden]` each (views of the stacked matrix).
    fn gate_and_up(&self) -> Result<(WeightMatrix, WeightMatrix), TchError> {
        Ok(match &self.gate_up {
            GateUp::Stacked { w13, intermediate } => (
                w13.narrow(0, *intermediate)?,
                w13.narrow(*intermediate, *intermediate)?,
            ),
            GateUp::Apart { w1, w3 } => (w1.shallow_clone(), w3.shallow_clone()),
        })
    }

    /// `out[r] += weight · expert(xs[r])` for each of `rows` and its weight;
    /// `xs` and `out` `[tokens, hidden]`, `out` in `xs`'s dtype. A few rows on
    /// the CPU run on the kernels in one call, without gathering or adding
    /// through libtorch.
    pub fn add_rows(
        &self,
        xs: &Tensor,
        rows: &[usize],
        weights: &[f32],
        out: &mut Tensor,
    ) -> Result<(), ForwardError> {
        if rows.is_empty() {
            return Ok(());
        }
        let [w1, w3, w2] = self.matrices()?;
        let routed = projection::RoutedExpert {
            weights: [w1.as_ref(), w3.as_ref(), w2.as_ref()],
            biases: self.biases(),
            activation: self.activation,
            rows,
            routing: weights,
        };
        if projection::add_experts(xs, &[routed], out)? {
            return Ok(());
        }
        let device = xs.device();
        let index: Vec<i64> = rows.iter().map(|&row| row as i64).collect();
        let index = Tensor::f_from_slice(&index)?.f_to_device(device)?;
        let scale = Tensor::f_from_slice(weights)?
            .f_to_device(device)?
            .f_to_kind(xs.kind())?;
        let y = self
            .forward(&xs.f_index_select(0, &index)?)?
            .f_mul(&scale.f_unsqueeze(1)?)?;
        let _ = out.f_index_add_(0, &index, &y.f_to_kind(out.kind())?)?;
        Ok(())
    }

    /// `xs`: `[rows, hidden]` -> `[rows, hidden]`, through libtorch where
    /// the kernels do not take the gate/up projection.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        if !self.plain_swiglu() {
            return self.forward_biased(xs);
        }
        let (w1, w3) = self.gate_and_up()?;
        let on_kernels = projection::swiglu(xs, w1.as_ref(), w3.as_ref())?;
        let hidden = match (on_kernels, &self.gate_up) {
            (Some(hidden), _) => hidden,
            (None, GateUp::Stacked { w13, intermediate }) => {
                let projected =
                    xs.f_linear(&w13.as_ref().dequantize(xs.kind())?, None::<Tensor>)?;
                projected
                    .f_narrow(1, 0, *intermediate)?
                    .f_silu()?
                    .f_mul(&projected.f_narrow(1, *intermediate, *intermediate)?)?
            }
            (None, GateUp::Apart { w1, w3 }) => {
                let (w1, w3) = (MatrixRef::from(w1), MatrixRef::from(w3));
                xs.f_linear(&w1.dequantize(xs.kind())?, None::<Tensor>)?
                    .f_silu()?
                    .f_mul(&xs.f_linear(&w3.dequantize(xs.kind())?, None::<Tensor>)?)?
            }
        };
        projection::linear(&hidden, &self.w2)
    }

    /// [`Expert::forward`] with biases and the expert's activation, as
    /// transformers' `GptOssExperts` computes it: each projection biased,
    /// then the activation.
    fn forward_biased(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let (gate_up_bias, down_bias) = match &self.biases {
            Some([gate_up, down]) => (Some(gate_up), Some(down)),
            None => (None, None),
        };
        let (gate, up) = match &self.gate_up {
            GateUp::Stacked { w13, intermediate } => {
                let projected = projection::linear_biased(xs, w13, gate_up_bias)?;
                (
                    projected.f_narrow(1, 0, *intermediate)?,
                    projected.f_narrow(1, *intermediate, *intermediate)?,
                )
            }
            GateUp::Apart { w1, w3 } => {
                let intermediate = w1.size()[0];
                let bias = |start| gate_up_bias.map(|b| b.narrow(0, start, intermediate));
                (
                    projection::linear_biased(xs, w1, bias(0).as_ref())?,
                    projection::linear_biased(xs, w3, bias(intermediate).as_ref())?,
                )
            }
        };
        let hidden = match self.activation {
            Activation::SwiGlu => gate.f_silu()?.f_mul(&up)?,
            Activation::ClampedSwiGlu { limit, alpha } => {
                let gate = gate.f_clamp_max(limit)?;
                let up = up.f_clamp(-limit, limit)?;
                let glu = gate.f_mul(&gate.f_mul_scalar(alpha)?.f_sigmoid()?)?;
                up.f_add_scalar(1.0)?.f_mul(&glu)?
            }
        };
        projection::linear_biased(&hidden, &self.w2, down_bias)
    }
}

#[cfg(test)]
mod tests {
    //! `add_rows` (the kernels for a few rows, libtorch for more) against
    //! the same expert computed in f32 with libtorch's ops.

    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::projection::KERNEL_ROWS;

    #[test]
    fn add_rows_matches_libtorch_in_each_dtype_and_row_count() -> anyhow::Result<()> {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(11);
        let (tokens, hidden, intermediate) = (40i64, 64i64, 96i64);
        let opts = (Kind::Float, Device::Cpu);
        let weight = |rows, cols: i64| Tensor::randn([rows, cols], opts) / (cols as f64).sqrt();
        // Two experts adding into the same rows, as a token's top-2 do.
        let weights: Vec<[Tensor; 3]> = (0..2)
            .map(|_| {
                [
                    weight(intermediate, hidden),
                    weight(hidden, intermediate),
                    weight(intermediate, hidden),
                ]
            })
            .collect();
        // f32 summation order; bf16: a few roundings of 2⁻⁸ each. Held in
        // int8, against the same computation on the dequantized weights.
        let cases = [
            (Kind::Float, None, 1e-5),
            (Kind::BFloat16, None, 6.0 / 256.0),
            (Kind::Float, Some(Quantization::Int8), 1e-5),
            (Kind::BFloat16, Some(Quantization::Int8), 6.0 / 256.0),
        ];
        for (kind, quantization, tolerance) in cases {
            let xs = Tensor::randn([tokens, hidden], opts).to_kind(kind);
            let held = |w: &Tensor| WeightMatrix::new(w.to_kind(kind), quantization).unwrap();
            let experts: Vec<Expert> = weights
                .iter()
                .map(|[w1, w2, w3]| Expert::from_matrices(held(w1), held(w2), held(w3)).unwrap())
                .collect();
            // What the experts stand for, in f32.
            let as_held: Vec<[Tensor; 3]> = experts
                .iter()
                .map(|expert| {
                    let [w1, w3, w2] = expert.weights(Kind::Float).unwrap();
                    [w1, w2, w3].map(|w| w.to_kind(Kind::Float))
                })
                .collect();
            if quantization.is_some() {
                let (bytes, dtype) = experts[0].bytes();
                assert_eq!(dtype, "int8");
                assert_eq!(
                    bytes as i64,
                    3 * hidden * intermediate + 4 * (2 * intermediate + hidden)
                );
            }
            for count in [1, 2, 5, KERNEL_ROWS, KERNEL_ROWS + 3] {
                let count = count as usize;
                let rows: Vec<Vec<usize>> = vec![
                    (0..count).map(|i| (i * 7) % tokens as usize).collect(),
                    (0..count).map(|i| (i * 3 + 1) % tokens as usize).collect(),
                ];
                let scale: Vec<Vec<f32>> = (0..2)
                    .map(|e| {
                        (0..count)
                            .map(|i| 0.25 + 0.5 * ((i + e) % 2) as f32)
                            .collect()
                    })
                    .collect();
                let mut ours = xs.zeros_like();
                for (e, expert) in experts.iter().enumerate() {
                    expert.add_rows(&xs, &rows[e], &scale[e], &mut ours)?;
                }

                let f32 = |t: &Tensor| t.to_kind(Kind::Float);
                let mut reference = Tensor::zeros([tokens, hidden], opts);
                for (e, [w1, w2, w3]) in as_held.iter().enumerate() {
                    let index: Vec<i64> = rows[e].iter().map(|&r| r as i64).collect();
                    let index = Tensor::from_slice(&index);
                    let x = f32(&xs).index_select(0, &index);
                    let h = x.linear(w1, None::<Tensor>).silu() * x.linear(w3, None::<Tensor>);
                    let y =
                        h.linear(w2, None::<Tensor>) * Tensor::from_slice(&scale[e]).unsqueeze(1);
                    let _ = reference.index_add_(0, &index, &y);
                }
                let err = ((f32(&ours) - &reference).abs() / (reference.abs() + 1.0))
                    .max()
                    .double_value(&[]);
                assert!(
                    err <= tolerance,
                    "{kind:?} {quantization:?}, {count} rows: error {err}"
                );
                // Rows no expert was routed stay zero.
                let touched: std::collections::HashSet<usize> =
                    rows.iter().flatten().copied().collect();
                let untouched: Vec<i64> = (0..tokens as usize)
                    .filter(|r| !touched.contains(r))
                    .map(|r| r as i64)
                    .collect();
                let rest = ours.index_select(0, &Tensor::from_slice(&untouched));
                assert_eq!(rest.abs().sum(Kind::Float).double_value(&[]), 0.0);
            }
        }
        Ok(())
    }
}
