//! RMSNorm, computed in fp32 as in HF `MixtralRMSNorm` (and every family's,
//! q/k norms included): a decode step's few
//! rows on the CPU in one pass of [`tramontane_kernels::rms_norm`], more
//! rows through libtorch's ops.

use tch::{Kind, TchError, Tensor};
use tramontane_kernels::{Bf16, F32};

use crate::projection::{elements, elements_mut, small_rows};

pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        if let Some(out) = self.forward_small(xs)? {
            return Ok(out);
        }
        let kind = xs.kind();
        let xs32 = xs.f_to_kind(Kind::Float)?;
        let variance = xs32
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(-1, true, Kind::Float)?;
        let normed = xs32.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        self.weight.f_mul(&normed.f_to_kind(kind)?)
    }

    /// The few-rows CPU path; None where it does not apply.
    fn forward_small(&self, xs: &Tensor) -> Result<Option<Tensor>, TchError> {
        let (kind, size) = (xs.kind(), xs.size());
        let Some(&hidden) = size.last() else {
            return Ok(None);
        };
        let rows = xs.numel() as i64 / hidden.max(1);
        let fits = small_rows(kind, xs.device(), rows)
            && self.weight.kind() == kind
            && self.weight.size() == [hidden]
            && self.weight.device() == tch::Device::Cpu
            && self.weight.is_contiguous();
        if !fits {
            return Ok(None);
        }
        let xs = xs.f_contiguous()?;
        let out = xs.f_empty_like()?;
        let eps = self.eps as f32;
        // SAFETY: on the CPU, contiguous, of the element's kind (checked);
        // `out` is fresh and all outlive the call.
        let done = unsafe {
            match kind {
                Kind::BFloat16 => tramontane_kernels::rms_norm::<Bf16>(
                    elements(&xs),
                    elements(&self.weight),
                    eps,
                    elements_mut(&out),
                ),
                _ => tramontane_kernels::rms_norm::<F32>(
                    elements(&xs),
                    elements(&self.weight),
                    eps,
                    elements_mut(&out),
                ),
            }
        };
        Ok(done.ok().map(|()| out))
    }
}
