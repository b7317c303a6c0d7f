//! The model a plan is for: its config.json (from a checkpoint folder, or
//! the file itself: no weights are needed), its id (what a routing trace
//! must have been recorded on) and its name.

use std::path::{Path, PathBuf};

use tramontane_config::{ConfigError, Dtype, MixtralConfig};

#[derive(Debug, Clone)]
pub struct PlannedModel {
    pub config: MixtralConfig,
    /// Hex SHA-256 of the config.json.
    pub model_id: String,
    /// The checkpoint folder's name.
    pub name: String,
}

impl PlannedModel {
    /// Reads a checkpoint folder's config.json, or a config.json.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let file: PathBuf = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let config = MixtralConfig::from_file(&file)?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let model_id = tramontane_config::model_id(dir)?;
        let named = if path.is_dir() { path } else { dir };
        let name = named
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned());
        Ok(Self {
            config,
            model_id,
            name,
        })
    }

    /// `dtype`, or else the config's `torch_dtype` (bf16 when it has none).
    pub fn dtype(&self, dtype: Option<Dtype>) -> Result<Dtype, ConfigError> {
        match dtype {
            Some(dtype) => Ok(dtype),
            None => Dtype::from_hf_name(self.config.torch_dtype.as_deref().unwrap_or("bfloat16")),
        }
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
        assert_eq!(from_dir.config.num_local_experts, 8);
        assert_eq!(from_dir.dtype(None).unwrap(), Dtype::Bf16);
        assert_eq!(from_dir.dtype(Some(Dtype::F32)).unwrap(), Dtype::F32);
    }
}
