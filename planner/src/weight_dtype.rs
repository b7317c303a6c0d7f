//! How the routed experts' weights are stored, for the memory arithmetic
//! and the rooflines: in a float dtype, or quantized weight-only with their
//! scales (activations stay in the compute dtype either way).
//!
//! - `int8`: one byte a weight and an f32 scale per output channel (row).
//! - `fp8`: e4m3, one byte a weight and an f32 `weight_scale_inv` per
//!   128×128 block, as published FP8 checkpoints store them
//!   (`quantization_config.quant_method == "fp8"`).
//! - `mxfp4`: OCP MX, 4 bits a weight and a one-byte (e8m0) scale per 32
//!   weights of a row, as gpt-oss stores its experts
//!   (`quant_method == "mxfp4"`).

use tramontane_config::Dtype;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
    Int8,
    Fp8,
    Mxfp4,
}

impl WeightDtype {
    pub const ALL: [WeightDtype; 6] = [
        WeightDtype::F32,
        WeightDtype::Bf16,
        WeightDtype::F16,
        WeightDtype::Int8,
        WeightDtype::Fp8,
        WeightDtype::Mxfp4,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
            WeightDtype::Int8 => "int8",
            WeightDtype::Fp8 => "fp8",
            WeightDtype::Mxfp4 => "mxfp4",
        }
    }

    /// Stored in fewer bits than a float dtype, with scales.
    pub fn quantized(self) -> bool {
        matches!(
            self,
            WeightDtype::Int8 | WeightDtype::Fp8 | WeightDtype::Mxfp4
        )
    }

    /// Weights stored as the compute dtype.
    pub fn of(dtype: Dtype) -> Self {
        match dtype {
            Dtype::F32 => WeightDtype::F32,
            Dtype::Bf16 => WeightDtype::Bf16,
            Dtype::F16 => WeightDtype::F16,
        }
    }

    /// The storage a checkpoint's `quantization_config.quant_method` names;
    /// None for a method this planner does not size (it is refused by name).
    pub fn of_quant_method(method: &str) -> Option<Self> {
        match method {
            "fp8" => Some(WeightDtype::Fp8),
            "mxfp4" => Some(WeightDtype::Mxfp4),
            _ => None,
        }
    }

    /// Bytes of a `[rows, cols]` matrix stored so, its scales included.
    pub fn matrix_bytes(self, rows: u64, cols: u64) -> u64 {
        match self {
            WeightDtype::F32 => 4 * rows * cols,
            WeightDtype::Bf16 | WeightDtype::F16 => 2 * rows * cols,
            WeightDtype::Int8 => rows * cols + 4 * rows,
            WeightDtype::Fp8 => rows * cols + 4 * rows.div_ceil(128) * cols.div_ceil(128),
            // 32 weights of 4 bits (16 bytes) and their scale (1 byte).
            WeightDtype::Mxfp4 => rows * cols.div_ceil(32) * 17,
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|w| w.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|w| w.name()).collect();
                format!(
                    "{text:?} is not a weight dtype (one of {})",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_are_sized_with_their_scales_by_hand() {
        // Mixtral-8x7B's w1: [14336, 4096].
        let (rows, cols) = (14_336u64, 4_096u64);
        let weights = rows * cols; // 58,720,256
        assert_eq!(WeightDtype::Bf16.matrix_bytes(rows, cols), 117_440_512);
        assert_eq!(WeightDtype::F32.matrix_bytes(rows, cols), 234_881_024);
        // One byte a weight, an f32 scale per row: 58,720,256 + 57,344.
        assert_eq!(WeightDtype::Int8.matrix_bytes(rows, cols), 58_777_600);
        // 112 × 32 blocks of 128×128, an f32 each: + 14,336.
        assert_eq!(WeightDtype::Fp8.matrix_bytes(rows, cols), weights + 14_336);
        // 128 blocks of 32 per row, 17 bytes each: 14336 × 128 × 17.
        assert_eq!(WeightDtype::Mxfp4.matrix_bytes(rows, cols), 31_195_136);
        // A dimension that is not a multiple of the block still pays a whole block.
        assert_eq!(WeightDtype::Fp8.matrix_bytes(129, 1), 129 + 4 * 2);
        assert_eq!(WeightDtype::Mxfp4.matrix_bytes(1, 33), 2 * 17);
    }

    #[test]
    fn names_parse_and_an_unknown_one_lists_the_allowed() {
        for w in WeightDtype::ALL {
            assert_eq!(w.name().parse::<WeightDtype>(), Ok(w));
        }
        let err = "int4".parse::<WeightDtype>().unwrap_err();
        assert!(
            err.contains("int4") && err.contains("int8, fp8, mxfp4"),
            "{err}"
        );
        assert_eq!(WeightDtype::of_quant_method("fp8"), Some(WeightDtype::Fp8));
        assert_eq!(WeightDtype::of_quant_method("gptq"), None);
    }
}
