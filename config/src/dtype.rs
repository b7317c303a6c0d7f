//! The dtypes weights are stored, loaded and computed in, and hidden states
//! sent in: their command-line names (`f32`, `bf16`, `f16`), their
//! `torch_dtype` names in config.json and their sizes.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::error::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
        }
    }

    /// The command-line spelling (`--dtype`, `--wire-dtype`).
    pub fn flag(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    /// The `torch_dtype` spelling of config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::F16 => "float16",
        }
    }

    pub fn from_hf_name(name: &str) -> Result<Self, ConfigError> {
        Self::ALL
            .into_iter()
            .find(|d| d.hf_name() == name)
            .ok_or_else(|| ConfigError::UnsupportedDtype(name.into()))
    }
}

/// A quantization applied to a checkpoint's weights at load
/// (`--quantize`): they are stored in memory in fewer bits, and the
/// activations stay in the compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Quantization {
    /// int8 with one f32 scale per output row (the row's largest magnitude
    /// maps to 127).
    Int8,
}

impl Quantization {
    /// The command-line spelling, also the dtype's name in metrics.
    pub fn flag(self) -> &'static str {
        match self {
            Quantization::Int8 => "int8",
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flag())
    }
}

/// The `torch_dtype` a config.json's text names, as written (every family
/// names the checkpoint's dtype there); None where it names none.
pub fn torch_dtype(text: &str) -> Result<Option<String>, ConfigError> {
    #[derive(Deserialize)]
    struct Said {
        #[serde(default)]
        torch_dtype: Option<String>,
    }
    serde_json::from_str::<Said>(text)
        .map(|said| said.torch_dtype)
        .map_err(|error| ConfigError::Parse { path: None, error })
}

/// The `quantization_config.quant_method` a config.json's text names (how
/// a quantized checkpoint stores its weights: `fp8`, `mxfp4`, ...), as
/// written; None where it has none.
pub fn quant_method(text: &str) -> Result<Option<String>, ConfigError> {
    Ok(quantization_config(text)?.and_then(|q| q.quant_method))
}

/// The fields of a config.json's `quantization_config` that say how the
/// checkpoint stores its weights.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QuantizationConfig {
    #[serde(default)]
    pub quant_method: Option<String>,
    /// FP8: the rows and columns of weights one scale covers.
    #[serde(default)]
    pub weight_block_size: Option<Vec<usize>>,
}

/// A config.json's `quantization_config`, None where it has none.
pub fn quantization_config(text: &str) -> Result<Option<QuantizationConfig>, ConfigError> {
    #[derive(Deserialize)]
    struct Said {
        #[serde(default)]
        quantization_config: Option<QuantizationConfig>,
    }
    serde_json::from_str::<Said>(text)
        .map(|said| said.quantization_config)
        .map_err(|error| ConfigError::Parse { path: None, error })
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.flag())
    }
}

impl FromStr for Dtype {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.flag() == text)
            .ok_or_else(|| format!("unknown dtype {text:?} (f32, bf16 or f16)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_hf_name(d.hf_name()).unwrap(), d);
            assert_eq!(d.flag().parse::<Dtype>().unwrap(), d);
        }
        assert!(Dtype::from_hf_name("int8").is_err());
        assert!("int8".parse::<Dtype>().is_err());
        assert_eq!((Dtype::F32.bytes(), Dtype::Bf16.bytes()), (4, 2));
    }

    #[test]
    fn torch_dtype_is_read_as_written_whatever_the_family() {
        let said = |text| torch_dtype(text).unwrap();
        assert_eq!(
            said(r#"{"model_type": "qwen3_moe", "torch_dtype": "bfloat16"}"#),
            Some("bfloat16".into())
        );
        assert_eq!(said(r#"{"model_type": "olmoe"}"#), None);
        assert!(torch_dtype("{").is_err());
    }

    #[test]
    fn quant_method_is_read_as_written() {
        let said = |text| quant_method(text).unwrap();
        assert_eq!(
            said(
                r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}"#
            ),
            Some("fp8".into())
        );
        assert_eq!(said(r#"{"quantization_config": {}}"#), None);
        assert_eq!(said(r#"{"model_type": "mixtral"}"#), None);
        assert!(quant_method("{").is_err());
    }
}
