//! Server manifests: the TOML files of `tools-catalog/`, one server each, so an operator
//! can keep the catalog in git (`servers sync`) and the demo registers what the catalog
//! describes.
//!
//! ```toml
//! slug = "unit-converter"                       # [a-z0-9][a-z0-9-]{0,31}
//! name = "Unit Converter"
//! description = "Convert lengths, masses, …"
//! categories = ["utilities"]
//! endpoints = ["https://units.example.com/mcp"] # one or more; https unless allowed
//! pricing = "0.002_per_request"                 # or "free"
//! timeout = "10s"                               # per call, at most 300 s (default 30 s)
//! owner = "demo-creator"                        # the creator's account name
//! [tool_prices]                                 # per-tool overrides, USD per call
//! list_units = "free"
//! ```
//!
//! A manifest is only parsed and shaped here; every field is validated by
//! [`super::Catalog::register`] like any other registration.

use std::collections::BTreeMap;
use std::path::Path;

use super::NewServer;

/// Largest manifest file read (bytes): a manifest is a few hundred bytes.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read, or is larger than [`MAX_MANIFEST_BYTES`].
    #[error("cannot read manifest {0}: {1}")]
    Read(String, String),
    /// Not TOML of the manifest's shape (unknown keys are refused, to catch typos).
    #[error("invalid manifest {0}: {1}")]
    Parse(String, String),
    /// The `timeout` is not a duration such as `10s`.
    #[error("invalid manifest {0}: timeout '{1}' is not a duration such as 10s")]
    Timeout(String, String),
}

/// One server as a manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The server's slug.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Categories.
    #[serde(default)]
    pub categories: Vec<String>,
    /// Endpoint URLs, first preferred.
    pub endpoints: Vec<String>,
    /// `free` or `<decimal>_per_request`.
    pub pricing: String,
    /// Per-call upstream timeout, e.g. `10s`.
    #[serde(default)]
    pub timeout: Option<String>,
    /// The creator's account name.
    #[serde(default)]
    pub owner: Option<String>,
    /// Per-tool overrides: tool → USD per call (`0.05`) or `free`.
    #[serde(default)]
    pub tool_prices: BTreeMap<String, String>,
}

impl Manifest {
    /// Parses manifest text; `origin` names it in errors (a file name).
    ///
    /// # Errors
    /// [`ManifestError::Parse`].
    pub fn parse(text: &str, origin: &str) -> Result<Self, ManifestError> {
        toml::from_str(text).map_err(|e| ManifestError::Parse(origin.to_owned(), e.to_string()))
    }

    /// Reads and parses one manifest file (at most [`MAX_MANIFEST_BYTES`]).
    ///
    /// # Errors
    /// [`ManifestError::Read`], [`ManifestError::Parse`].
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let origin = path.display().to_string();
        let size = std::fs::metadata(path)
            .map_err(|e| ManifestError::Read(origin.clone(), e.to_string()))?
            .len();
        if size > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Read(
                origin,
                format!("larger than {MAX_MANIFEST_BYTES} bytes"),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ManifestError::Read(origin.clone(), e.to_string()))?;
        Self::parse(&text, &origin)
    }

    /// The registration this manifest asks for.
    ///
    /// # Errors
    /// [`ManifestError::Timeout`] when `timeout` is not a duration.
    pub fn to_new_server(&self) -> Result<NewServer, ManifestError> {
        let timeout_ms = match &self.timeout {
            Some(t) => Some(
                humantime::parse_duration(t)
                    .map_err(|_| ManifestError::Timeout(self.slug.clone(), t.clone()))?
                    .as_millis()
                    .min(i64::MAX as u128) as i64,
            ),
            None => None,
        };
        Ok(NewServer {
            name: self.name.clone(),
            slug: Some(self.slug.clone()),
            description: self.description.clone(),
            categories: self.categories.clone(),
            endpoints: self.endpoints.clone(),
            pricing: self.pricing.clone(),
            tool_prices: self.tool_prices.clone(),
            timeout_ms,
        })
    }
}

/// The manifests of the repository's `tools-catalog/`, compiled in, by file name: the
/// example servers the demo starts.
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "unit-converter.toml",
        include_str!("../../tools-catalog/unit-converter.toml"),
    ),
    ("notes.toml", include_str!("../../tools-catalog/notes.toml")),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_manifests_parse_into_registrations() {
        for (file, text) in BUILT_IN {
            let m = Manifest::parse(text, file).expect("a built-in manifest parses");
            assert_eq!(format!("{}.toml", m.slug), *file);
            let new = m.to_new_server().expect("a registration");
            assert_eq!(new.slug.as_deref(), Some(m.slug.as_str()));
            assert!(new.timeout_ms.is_some());
        }
    }

    #[test]
    fn typos_and_bad_timeouts_are_refused() {
        let typo = "slug = \"a\"\nname = \"A\"\nendpoints = []\npricing = \"free\"\npricng = \"x\"";
        assert!(matches!(
            Manifest::parse(typo, "t.toml"),
            Err(ManifestError::Parse(..))
        ));
        let bad =
            "slug = \"a\"\nname = \"A\"\nendpoints = []\npricing = \"free\"\ntimeout = \"soon\"";
        let m = Manifest::parse(bad, "t.toml").expect("parses");
        assert!(matches!(m.to_new_server(), Err(ManifestError::Timeout(..))));
    }
}
