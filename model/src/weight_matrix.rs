//! A projection's weight matrix as this process holds it: in the compute
//! dtype as the checkpoint has it, quantized at load (`--quantize int8`:
//! int8 values and one f32 scale per output row), or as an FP8 checkpoint
//! stores it (e4m3 values and an f32 scale per block), or as an MXFP4
//! checkpoint stores gpt-oss's experts (E2M1 values two a byte, an E8M0
//! scale per 32). The projections
//! ([`crate::projection`]) take either; the kernels stream the int8 values
//! and widen them in registers, libtorch gets the matrix dequantized per
//! call (other devices, prefill).

use tch::{Kind, TchError, Tensor};
use tramontane_config::{Dtype, Quantization};
use tramontane_kernels::E2M1;

/// `[outputs, inner]`, row-major.
pub enum WeightMatrix {
    /// In the compute kind.
    Plain(Tensor),
    /// int8 values `[outputs, inner]` and f32 scales `[outputs]`:
    /// `w[n][i] = values[n][i] · scales[n]`.
    Int8 { values: Tensor, scales: Tensor },
    /// FP8 e4m3 values `[outputs, inner]` and f32 scales per block of
    /// `block` weights, `[⌈outputs / block.0⌉, ⌈inner / block.1⌉]`, as an
    /// FP8 checkpoint stores them (`weight`, `weight_scale_inv`), held so.
    Fp8 {
        values: Tensor,
        scales: Tensor,
        block: (i64, i64),
    },
    /// MXFP4, as gpt-oss checkpoints store their experts: `blocks` `[outputs,
    /// inner / 2]` bytes, each two E2M1 values (the low nibble first), and
    /// `scales` `[outputs, inner / 32]` bytes, E8M0 exponents:
    /// `w[n][i] = e2m1(nibble i of row n) · 2^(scales[n][i / 32] − 127)`.
    Mxfp4 { blocks: Tensor, scales: Tensor },
}

/// A borrowed [`WeightMatrix`], or a plain tensor: what the projections
/// take.
#[derive(Clone, Copy)]
pub enum MatrixRef<'a> {
    Plain(&'a Tensor),
    Int8 {
        values: &'a Tensor,
        scales: &'a Tensor,
    },
    Fp8 {
        values: &'a Tensor,
        scales: &'a Tensor,
        block: (i64, i64),
    },
    Mxfp4 {
        blocks: &'a Tensor,
        scales: &'a Tensor,
    },
}

impl<'a> From<&'a Tensor> for MatrixRef<'a> {
    fn from(w: &'a Tensor) -> Self {
        MatrixRef::Plain(w)
    }
}

impl<'a> From<&'a WeightMatrix> for MatrixRef<'a> {
    fn from(w: &'a WeightMatrix) -> Self {
        match w {
            WeightMatrix::Plain(w) => MatrixRef::Plain(w),
            WeightMatrix::Int8 { values, scales } => MatrixRef::Int8 { values, scales },
            WeightMatrix::Fp8 {
                values,
                scales,
                block,
            } => MatrixRef::Fp8 {
                values,
                scales,
                block: *block,
            },
            WeightMatrix::Mxfp4 { blocks, scales } => MatrixRef::Mxfp4 { blocks, scales },
        }
    }
}

impl WeightMatrix {
    /// `w` as this process holds it: quantized where `quantization` says,
    /// otherwise as given.
    pub fn new(w: Tensor, quantization: Option<Quantization>) -> Result<Self, TchError> {
        match quantization {
            None => Ok(WeightMatrix::Plain(w)),
            Some(Quantization::Int8) => Self::int8(&w),
        }
    }

    /// Per output row, the scale maps the row's largest magnitude to 127
    /// (1 for a row of zeros) and each value rounds to the nearest step.
    pub fn int8(w: &Tensor) -> Result<Self, TchError> {
        let w = w.f_to_kind(Kind::Float)?;
        let largest = w.f_abs()?.f_amax(1, false)?;
        let scales = largest
            .f_where_scalarother(&largest.f_gt(0.0)?, 127.0)?
            .f_div_scalar(127.0)?;
        let values = w
            .f_div(&scales.f_unsqueeze(1)?)?
            .f_round()?
            .f_clamp(-127, 127)?
            .f_to_kind(Kind::Int8)?;
        Ok(WeightMatrix::Int8 { values, scales })
    }

    pub fn as_ref(&self) -> MatrixRef<'_> {
        self.into()
    }

    /// `[outputs, inner]`.
    pub fn size(&self) -> Vec<i64> {
        self.as_ref().size()
    }

    /// Bytes held: the matrix, and its scales.
    pub fn bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        match self {
            WeightMatrix::Plain(w) => bytes(w),
            WeightMatrix::Int8 { values, scales }
            | WeightMatrix::Fp8 { values, scales, .. }
            | WeightMatrix::Mxfp4 {
                blocks: values,
                scales,
            } => bytes(values) + bytes(scales),
        }
    }

    /// The dtype's name as metrics label it: `int8`, or the compute kind's
    /// (`bf16`, `f32`, `f16`).
    pub fn dtype_name(&self) -> &'static str {
        match self {
            WeightMatrix::Plain(w) => crate::dtype::dtype(w.kind()).map_or("other", Dtype::flag),
            WeightMatrix::Int8 { .. } => Quantization::Int8.flag(),
            WeightMatrix::Fp8 { .. } => "fp8",
            WeightMatrix::Mxfp4 { .. } => "mxfp4",
        }
    }

    /// Whether stacking this matrix above another keeps each row's scales
    /// (not FP8's blocks, which may straddle the seam).
    pub fn stacks(&self) -> bool {
        !matches!(self, WeightMatrix::Fp8 { .. })
    }

    /// Every `step`-th row from `start` (a copy): the gate's rows of
    /// gpt-oss's interleaved gate/up projection, or the up projection's.
    pub fn every_nth_row(&self, start: i64, step: i64) -> Result<Self, TchError> {
        let rows = |t: &Tensor| -> Result<Tensor, TchError> {
            t.f_slice(0, start, None, step)?.f_contiguous()
        };
        Ok(match self {
            WeightMatrix::Plain(w) => WeightMatrix::Plain(rows(w)?),
            WeightMatrix::Int8 { values, scales } => WeightMatrix::Int8 {
                values: rows(values)?,
                scales: rows(scales)?,
            },
            WeightMatrix::Mxfp4 { blocks, scales } => WeightMatrix::Mxfp4 {
                blocks: rows(blocks)?,
                scales: rows(scales)?,
            },
            WeightMatrix::Fp8 { .. } => {
                return Err(TchError::Kind(
                    "FP8 matrices are held whole, not split".to_string(),
                ));
            }
        })
    }

    /// Rows `start..start + len` (views of the same storage).
    pub fn narrow(&self, start: i64, len: i64) -> Result<Self, TchError> {
        Ok(match self {
            WeightMatrix::Plain(w) => WeightMatrix::Plain(w.f_narrow(0, start, len)?),
            WeightMatrix::Int8 { values, scales } => WeightMatrix::Int8 {
                values: values.f_narrow(0, start, len)?,
                scales: scales.f_narrow(0, start, len)?,
            },
            WeightMatrix::Mxfp4 { blocks, scales } => WeightMatrix::Mxfp4 {
                blocks: blocks.f_narrow(0, start, len)?,
                scales: scales.f_narrow(0, start, len)?,
            },
            WeightMatrix::Fp8 { .. } => {
                return Err(TchError::Kind(
                    "FP8 matrices are held whole, not narrowed".to_string(),
                ));
            }
        })
    }

    /// `top`'s rows above `bottom`'s, stored alike.
    pub fn stack(top: &Self, bottom: &Self) -> Result<Self, TchError> {
        Ok(match (top, bottom) {
            (WeightMatrix::Plain(a), WeightMatrix::Plain(b)) => {
                WeightMatrix::Plain(Tensor::f_cat(&[a, b], 0)?)
            }
            (
                WeightMatrix::Int8 { values, scales },
                WeightMatrix::Int8 {
                    values: values2,
                    scales: scales2,
                },
            ) => WeightMatrix::Int8 {
                values: Tensor::f_cat(&[values, values2], 0)?,
                scales: Tensor::f_cat(&[scales, scales2], 0)?,
            },
            (
                WeightMatrix::Mxfp4 { blocks, scales },
                WeightMatrix::Mxfp4 {
                    blocks: blocks2,
                    scales: scales2,
                },
            ) => WeightMatrix::Mxfp4 {
                blocks: Tensor::f_cat(&[blocks, blocks2], 0)?,
                scales: Tensor::f_cat(&[scales, scales2], 0)?,
            },
            _ => {
                return Err(TchError::Kind(
                    "stacked matrices are stored alike".to_string(),
                ));
            }
        })
    }

    pub fn shallow_clone(&self) -> Self {
        match self {
            WeightMatrix::Plain(w) => WeightMatrix::Plain(w.shallow_clone()),
            WeightMatrix::Int8 { values, scales } => WeightMatrix::Int8 {
                values: values.shallow_clone(),
                scales: scales.shallow_clone(),
            },
            WeightMatrix::Fp8 {
                values,
                scales,
                block,
            } => WeightMatrix::Fp8 {
                values: values.shallow_clone(),
                scales: scales.shallow_clone(),
                block: *block,
            },
            WeightMatrix::Mxfp4 { blocks, scales } => WeightMatrix::Mxfp4 {
                blocks: blocks.shallow_clone(),
                scales: scales.shallow_clone(),
            },
        }
    }
}

impl<'a> MatrixRef<'a> {
    /// `[outputs, inner]`.
    pub fn size(self) -> Vec<i64> {
        match self {
            MatrixRef::Plain(w)
            | MatrixRef::Int8 { values: w, .. }
            | MatrixRef::Fp8 { values: w, .. } => w.size(),
            MatrixRef::Mxfp4 { blocks, .. } => {
                let size = blocks.size();
                vec![size[0], size[1] * 2]
            }
        }
    }

    /// The matrix as libtorch takes it for activations of `kind`: a plain
    /// tensor as it is (a kind other than the activations' is libtorch's to
    /// refuse), int8 values times their row's scale, in f32, then `kind`.
    pub fn dequantize(self, kind: Kind) -> Result<Tensor, TchError> {
        match self {
            MatrixRef::Plain(w) => Ok(w.shallow_clone()),
            MatrixRef::Int8 { values, scales } => values
                .f_to_kind(Kind::Float)?
                .f_mul(&scales.f_unsqueeze(1)?)?
                .f_to_kind(kind),
            MatrixRef::Fp8 {
                values,
                scales,
                block: (rows, columns),
            } => {
                let size = values.size();
                let each = scales
                    .f_repeat_interleave_self_int(rows, 0, None::<i64>)?
                    .f_repeat_interleave_self_int(columns, 1, None::<i64>)?
                    .f_narrow(0, 0, size[0])?
                    .f_narrow(1, 0, size[1])?;
                values.f_to_kind(Kind::Float)?.f_mul(&each)?.f_to_kind(kind)
            }
            MatrixRef::Mxfp4 { blocks, scales } => {
                let device = blocks.device();
                let table = Tensor::f_from_slice(&E2M1)?.f_to_device(device)?;
                let bytes = blocks.f_to_kind(Kind::Int64)?;
                let low = table.f_index_select(0, &bytes.f_bitwise_and(15)?.f_flatten(0, -1)?)?;
                let high = table.f_index_select(
                    0,
                    &bytes
                        .f_bitwise_right_shift_tensor_scalar(4)?
                        .f_flatten(0, -1)?,
                )?;
                let outputs = blocks.size()[0];
                let values = Tensor::f_stack(&[low, high], 1)?.f_view([outputs, -1, 32])?;
                let scale = scales
                    .f_to_kind(Kind::Float)?
                    .f_sub_scalar(127.0)?
                    .f_exp2()?
                    .f_unsqueeze(2)?;
                values.f_mul(&scale)?.f_view([outputs, -1])?.f_to_kind(kind)
            }
        }
    }

    /// The tensors read, named for error messages.
    pub(crate) fn tensors(self) -> Vec<(&'static str, &'a Tensor)> {
        match self {
            MatrixRef::Plain(w) => vec![("the weight", w)],
            MatrixRef::Int8 { values, scales }
            | MatrixRef::Fp8 { values, scales, .. }
            | MatrixRef::Mxfp4 {
                blocks: values,
                scales,
            } => {
                vec![("the weight", values), ("the weight's scales", scales)]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    #[test]
    fn int8_maps_each_rows_largest_magnitude_to_127_and_rounds_to_the_step() {
        let w = Tensor::from_slice(&[0.6f32, -1.0, 0.25, 0.0, 0.0, 0.0, 3.0, 1.0, -2.9])
            .reshape([3, 3]);
        let WeightMatrix::Int8 { values, scales } = WeightMatrix::int8(&w).unwrap() else {
            panic!("int8 is stored as int8");
        };
        assert_eq!(values.kind(), Kind::Int8);
        let values: Vec<i64> = Vec::try_from(values.to_kind(Kind::Int64).flatten(0, 1)).unwrap();
        assert_eq!(values, [76, -127, 32, 0, 0, 0, 127, 42, -123]);
        let scales: Vec<f32> = Vec::try_from(scales).unwrap();
        assert_eq!(scales, [1.0 / 127.0, 1.0, 3.0 / 127.0]);
        let matrix = WeightMatrix::int8(&w).unwrap();
        assert_eq!(matrix.bytes(), 9 + 3 * 4);
        assert_eq!(matrix.dtype_name(), "int8");
        let back = matrix.as_ref().dequantize(Kind::Float).unwrap();
        // Within half a step of each row.
        let step = Tensor::from_slice(&[1.0f32 / 127.0, 1.0, 3.0 / 127.0]).unsqueeze(1);
        let err = ((back - &w).abs() / step).max().double_value(&[]);
        assert!(err <= 0.5 + 1e-6, "{err}");
    }

    #[test]
    fn stacked_and_narrowed_int8_keeps_each_rows_scale() {
        let a = WeightMatrix::int8(&Tensor::from_slice(&[1.0f32, 2.0]).reshape([1, 2])).unwrap();
        let b = WeightMatrix::int8(&Tensor::from_slice(&[4.0f32, -8.0]).reshape([1, 2])).unwrap();
        let both = WeightMatrix::stack(&a, &b).unwrap();
        assert_eq!(both.size(), [2, 2]);
        let dequantized = |w: &WeightMatrix| -> Vec<f32> {
            let w = w.as_ref().dequantize(Kind::Float).unwrap();
            Vec::try_from(w.flatten(0, 1)).unwrap()
        };
        assert_eq!(dequantized(&both.narrow(0, 1).unwrap()), dequantized(&a));
        assert_eq!(dequantized(&both.narrow(1, 1).unwrap()), dequantized(&b));
        assert_eq!(dequantized(&b)[1], -8.0, "the largest magnitude is exact");
        let plain = WeightMatrix::Plain(Tensor::zeros([1, 2], (Kind::Float, Device::Cpu)));
        assert!(WeightMatrix::stack(&a, &plain).is_err());
    }
}
