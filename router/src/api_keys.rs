//! API keys of the public APIs: `Authorization: Bearer KEY` on HTTP, the
//! same `authorization` metadata on gRPC `Generation`. Keys are kept as
//! SHA-256 digests and compared in constant time, so neither the compare
//! nor a memory dump gives a key away.

use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The keys a server accepts; none: the APIs are open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<[[u8; 32]]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    #[error("an API key is empty")]
    Empty,
    #[error("an API key has whitespace or control characters in it")]
    NotPrintable,
    #[error("--api-key-file {path}")]
    File {
        path: String,
        #[source]
        error: std::io::Error,
    },
}

impl ApiKeys {
    /// The keys given; refuses an empty one or one that a header could not carry.
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Result<Self, ApiKeyError> {
        let digests = keys
            .into_iter()
            .map(|key| {
                let key = key.as_ref();
                if key.is_empty() {
                    return Err(ApiKeyError::Empty);
                }
                if !key.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ApiKeyError::NotPrintable);
                }
                Ok(digest(key.as_bytes()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            digests: digests.into(),
        })
    }

    /// The keys of a file, one per line; blank lines and lines starting
    /// with `#` are skipped.
    pub fn read_file(path: &Path) -> Result<Vec<String>, ApiKeyError> {
        let text = std::fs::read_to_string(path).map_err(|error| ApiKeyError::File {
            path: path.display().to_string(),
            error,
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(String::from)
            .collect())
    }

    /// No key is needed.
    pub fn is_open(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `authorization` (the header's or metadata's value) carries
    /// one of the keys; always true when no key is set.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(key) = authorization.and_then(bearer) else {
            return false;
        };
        let presented = digest(key);
        // Every digest is compared, whichever matches.
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |any, d| any | d.ct_eq(&presented));
        matched.into()
    }
}

/// The token of `Bearer TOKEN` (the scheme's case does not matter).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// What a refused client is told.
pub const REFUSED: &str = "a valid API key is needed: send it as `Authorization: Bearer KEY` (gRPC: `authorization` metadata)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_key_as_a_bearer_token_is_allowed() {
        let keys = ApiKeys::new(["sk-one", "sk-two"]).unwrap();
        assert!(keys.allows(Some(b"Bearer sk-one")));
        assert!(keys.allows(Some(b"bearer sk-two")));
        assert!(keys.allows(Some(b"BEARER  sk-two ")));
        for refused in [
            &b"Bearer sk-three"[..],
            b"Bearer sk-on",
            b"Bearer sk-one2",
            b"sk-one",
            b"Basic sk-one",
            b"Bearer ",
            b"Bearer",
            b"",
        ] {
            assert!(
                !keys.allows(Some(refused)),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
        assert!(!keys.allows(None));
        let open = ApiKeys::default();
        assert!(open.is_open() && open.allows(None));
        assert!(format!("{keys:?}").contains("2 keys") && !format!("{keys:?}").contains("sk-"));
    }

    #[test]
    fn bad_keys_and_key_files() {
        assert!(matches!(ApiKeys::new([""]), Err(ApiKeyError::Empty)));
        assert!(matches!(
            ApiKeys::new(["a key"]),
            Err(ApiKeyError::NotPrintable)
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# operators\nsk-a\n\n  sk-b  \n").unwrap();
        assert_eq!(ApiKeys::read_file(&path).unwrap(), ["sk-a", "sk-b"]);
        let missing = ApiKeys::read_file(&dir.path().join("none")).unwrap_err();
        assert!(missing.to_string().contains("--api-key-file"), "{missing}");
    }
}
