//! The model a plan is for: its config.json (from a checkpoint folder, or
//! the file itself: no weights are needed) read into the description every
//! family shares ([`ModelSpec`]), its id (what a routing trace must have
//! been recorded on) and its name; and [`SizedModel`], that description in
//! one dtype, which the memory arithmetic, the routing, the estimates and
//! the simulation take.

use std::path::{Path, PathBuf};

use tramontane_config::{ConfigError, Dtype, ModelSpec};

use crate::profile::ModelShape;
use crate::weight_dtype::WeightDtype;

#[derive(Debug, Clone)]
pub struct PlannedModel {
    pub spec: ModelSpec,
    /// config.json's `torch_dtype`, as written.
    pub torch_dtype: Option<String>,
    /// config.json's `quantization_config.quant_method`, where it has one.
    pub quant_method: Option<String>,
    /// Hex SHA-256 of the config.json.
    pub model_id: String,
    /// The checkpoint folder's name.
    pub name: String,
}

impl PlannedModel {
    /// Reads a checkpoint folder's config.json, or a config.json, of any
    /// family `ModelSpec` reads.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let file: PathBuf = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let (spec, torch_dtype, quant_method) = ConfigError::reading(&file, |text| {
            Ok((
                ModelSpec::from_json(text)?,
                tramontane_config::dtype::torch_dtype(text)?,
                tramontane_config::dtype::quant_method(text)?,
            ))
        })?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let model_id = tramontane_config::model_id(dir)?;
        let named = if path.is_dir() { path } else { dir };
        let name = named
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned());
        Ok(Self {
            spec,
            torch_dtype,
            quant_method,
            model_id,
            name,
        })
    }

    /// `dtype`, or else the config's `torch_dtype` (bf16 when it has none).
    pub fn dtype(&self, dtype: Option<Dtype>) -> Result<Dtype, ConfigError> {
        match dtype {
            Some(dtype) => Ok(dtype),
            None => Dtype::from_hf_name(self.torch_dtype.as_deref().unwrap_or("bfloat16")),
        }
    }

    /// How the experts' weights are stored: `weights`, or else as the
    /// checkpoint's `quantization_config` says, or else in `dtype`. A
    /// quantization method this planner cannot size is refused by name.
    pub fn weight_dtype(
        &self,
        weights: Option<WeightDtype>,
        dtype: Dtype,
    ) -> Result<WeightDtype, ConfigError> {
        match (weights, self.quant_method.as_deref()) {
            (Some(weights), _) => Ok(weights),
            (None, None) => Ok(WeightDtype::of(dtype)),
            (None, Some(method)) => {
                WeightDtype::of_quant_method(method).ok_or_else(|| ConfigError::Invalid {
                    field: "quantization_config.quant_method",
                    reason: format!(
                        "{method:?} is not one the planner sizes (fp8, mxfp4); give --weight-dtype"
                    ),
                })
            }
        }
    }

    /// The model computing in `dtype`, its experts' weights stored as `experts`.
    pub fn sized(&self, dtype: Dtype, experts: WeightDtype) -> SizedModel {
        SizedModel {
            spec: self.spec.clone(),
            dtype_bytes: dtype.bytes(),
            experts,
        }
    }
}

/// A model as the planner sizes it: its description, the bytes of one
/// activation or dense weight element, and how its routed experts' weights
/// are stored. Its memory arithmetic is in [`crate::memory`].
#[derive(Debug, Clone, PartialEq)]
pub struct SizedModel {
    pub spec: ModelSpec,
    /// 4 for f32, 2 for bf16.
    pub dtype_bytes: usize,
    /// The routed experts' weights (the dense part is in the compute dtype).
    pub experts: WeightDtype,
}

impl SizedModel {
    /// What a profile made for this model records of it.
    pub fn shape(&self) -> ModelShape {
        ModelShape::new(&self.spec, self.dtype_bytes).with_expert_weights(self.experts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_or_its_folder_name_the_same_model() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mixtral-8x7b");
        let from_dir = PlannedModel::read(&fixture).unwrap();
        let from_file = PlannedModel::read(&fixture.join("config.json")).unwrap();
        assert_eq!(from_dir.name, "mixtral-8x7b");
        assert_eq!(from_file.name, "mixtral-8x7b");
        assert_eq!(from_dir.model_id, from_file.model_id);
        assert_eq!(from_dir.spec.max_experts(), 8);
        assert_eq!(from_dir.dtype(None).unwrap(), Dtype::Bf16);
        assert_eq!(from_dir.dtype(Some(Dtype::F32)).unwrap(), Dtype::F32);
    }

    #[test]
    fn every_family_is_read_with_its_torch_dtype() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        for (name, layers, experts) in [
            ("qwen3-30b-a3b", 48, 128),
            ("qwen3-235b-a22b", 94, 128),
            ("qwen2-57b-a14b", 28, 64),
            ("olmoe-1b-7b-0924", 16, 64),
        ] {
            let model = PlannedModel::read(&fixtures.join(name)).unwrap();
            assert_eq!(model.name, name);
            assert_eq!(model.spec.layers.len(), layers, "{name}");
            assert_eq!(model.spec.experts_per_layer(), vec![experts; layers]);
            assert_eq!(model.torch_dtype.as_deref(), Some("bfloat16"), "{name}");
            assert_eq!(model.dtype(None).unwrap(), Dtype::Bf16);
            assert_eq!(model.sized(Dtype::F32, WeightDtype::F32).dtype_bytes, 4);
        }
    }

    #[test]
    fn a_config_without_torch_dtype_is_planned_in_bf16_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/olmoe-1b-7b-0924");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
                .unwrap();
        config.as_object_mut().unwrap().remove("torch_dtype");
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let model = PlannedModel::read(dir.path()).unwrap();
        assert_eq!(model.dtype(None).unwrap(), Dtype::Bf16);
        config["torch_dtype"] = "float64".into();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let model = PlannedModel::read(dir.path()).unwrap();
        let err = model.dtype(None).unwrap_err();
        assert!(err.to_string().contains("float64"), "{err}");
        // --dtype decides without it.
        assert_eq!(model.dtype(Some(Dtype::Bf16)).unwrap(), Dtype::Bf16);
    }
}
