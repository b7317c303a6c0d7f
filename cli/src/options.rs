//! Options shared by several subcommands: dtype, device, threads.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use safetensors::tensor::Dtype;
use tch::{Device, Kind};
use tramontane_model::LoadOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl WeightDtype {
    pub fn kind(self) -> Kind {
        match self {
            WeightDtype::F32 => Kind::Float,
            WeightDtype::Bf16 => Kind::BFloat16,
            WeightDtype::F16 => Kind::Half,
        }
    }

    pub fn safetensors(self) -> Dtype {
        match self {
            WeightDtype::F32 => Dtype::F32,
            WeightDtype::Bf16 => Dtype::BF16,
            WeightDtype::F16 => Dtype::F16,
        }
    }

    /// The `torch_dtype` spelling of config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "float32",
            WeightDtype::Bf16 => "bfloat16",
            WeightDtype::F16 => "float16",
        }
    }

    pub fn from_hf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "float32" => WeightDtype::F32,
            "bfloat16" => WeightDtype::Bf16,
            "float16" => WeightDtype::F16,
            other => bail!("unsupported torch_dtype {other:?}"),
        })
    }
}

/// Where and how the model computes.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// dtype the weights are loaded into and computed in.
    #[arg(long, value_enum, default_value = "f32", env = "TRAMONTANE_DTYPE")]
    pub dtype: WeightDtype,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu", env = "TRAMONTANE_DEVICE")]
    pub device: String,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long, env = "TRAMONTANE_THREADS")]
    pub threads: Option<i32>,
}

impl ComputeArgs {
    /// Validates the options and applies the thread count.
    pub fn load_options(&self) -> Result<LoadOptions> {
        let device = parse_device(&self.device)?;
        if let Some(threads) = self.threads {
            if threads < 1 {
                bail!("--threads must be at least 1, got {threads}");
            }
            tch::set_num_threads(threads);
        }
        Ok(LoadOptions {
            kind: self.dtype.kind(),
            device,
        })
    }
}

pub fn parse_device(text: &str) -> Result<Device> {
    if text == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(index) = text.strip_prefix("cuda:") else {
        bail!("device must be cpu or cuda:N, got {text:?}");
    };
    let Ok(index) = index.parse::<usize>() else {
        bail!("device must be cpu or cuda:N, got {text:?}");
    };
    let available = tch::Cuda::device_count() as usize;
    if index >= available {
        bail!("device {text} is not available ({available} CUDA devices)");
    }
    Ok(Device::Cuda(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_or_fail_clearly() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
            let err = parse_device(bad).unwrap_err().to_string();
            assert!(err.contains("cpu or cuda:N"), "{bad}: {err}");
        }
        if !tch::Cuda::is_available() {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("not available"), "{err}");
        }
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in [WeightDtype::F32, WeightDtype::Bf16, WeightDtype::F16] {
            assert_eq!(WeightDtype::from_hf_name(d.hf_name()).unwrap(), d);
        }
        assert!(WeightDtype::from_hf_name("int8").is_err());
    }
}
