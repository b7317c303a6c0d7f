//! The model identity: router and workers refuse to work together unless
//! they read the same `config.json`, and a routing trace or a measured
//! profile names the model it was made on.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::ConfigError;

/// Hex SHA-256 of the checkpoint folder's `config.json`.
pub fn model_id(dir: &Path) -> Result<String, ConfigError> {
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|error| ConfigError::Read { path, error })?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_the_sha256_of_config_json() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"abc").unwrap();
        assert_eq!(
            model_id(dir.path()).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let missing = model_id(&dir.path().join("none")).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }), "{missing}");
    }
}
