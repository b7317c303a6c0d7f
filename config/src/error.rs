//! Why a checkpoint's config cannot be used.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot parse {}: {error}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "config.json".into()))]
    Parse {
        path: Option<PathBuf>,
        error: serde_json::Error,
    },
    #[error("unsupported architecture {found}: the supported ones are {supported}")]
    UnsupportedArchitecture { found: String, supported: String },
    #[error("invalid config field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unsupported torch_dtype {0:?} (float32, bfloat16 or float16)")]
    UnsupportedDtype(String),
}

impl ConfigError {
    /// `parse` of the text of the file at `path`; errors name the file.
    pub fn reading<T>(
        path: &std::path::Path,
        parse: impl FnOnce(&str) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        parse(&text).map_err(|e| e.at(path))
    }

    fn at(self, path: &std::path::Path) -> Self {
        match self {
            ConfigError::Parse { error, .. } => ConfigError::Parse {
                path: Some(path.to_owned()),
                error,
            },
            other => other,
        }
    }
}
