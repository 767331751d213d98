//! Policy bundles: what policy authors ship. A gzipped tarball in OPA's
//! layout (`.manifest`, `*.rego`, `data.json`) plus `attestors/<name>.wasm`
//! modules, each named in the manifest with its method, sha256, config schema
//! and the host capabilities it may import; signed with OPA's
//! `.signatures.json` scheme (one JWT listing every file's SHA-256, JSON files
//! hashed canonically).
//!
//! This module owns the format, its limits, building, signing and
//! verification. It never activates anything: loading is the gateway's job.

mod active;
mod keys;
mod sign;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use active::{ActivationError, Bundles};
pub use keys::{BundleKeys, load_keys};
pub use sign::{SigningAlg, VerifiedSignature, sign, verify};

/// Largest compressed bundle accepted.
pub const MAX_BUNDLE_BYTES: usize = 32 << 20;
/// Largest total size once decompressed: a gzip bomb stops here.
const MAX_UNPACKED_BYTES: u64 = 128 << 20;
/// Most files in one bundle.
const MAX_FILES: usize = 2000;

/// The name of the signatures file, which is not itself signed.
pub const SIGNATURES_FILE: &str = ".signatures.json";

/// Host capabilities a module may be granted.
pub const CAPABILITIES: &[&str] = &["crypto", "clock", "log"];

/// Why a bundle was refused. The text says what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not a gzipped tarball, or an entry is unreadable.
    #[error("not a valid bundle archive: {0}")]
    Archive(String),
    /// A size or count limit was exceeded.
    #[error("bundle too large: {0}")]
    TooLarge(String),
    /// A path is absolute, climbs out (`..`), or is not a regular file.
    #[error("unsafe path in bundle: {0}")]
    Path(String),
    /// The `.manifest` is missing or invalid.
    #[error("manifest: {0}")]
    Manifest(String),
    /// The signature is missing, malformed or does not verify.
    #[error("signature: {0}")]
    Signature(String),
    /// A file's content does not match the signed hash, or the signed and
    /// present files differ.
    #[error("integrity: {0}")]
    Integrity(String),
    /// A file could not be read from disk.
    #[error("{0}")]
    Io(String),
}

/// A module entry of the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestorEntry {
    /// The attestation method it serves, e.g. `github_oidc`.
    pub method: String,
    /// Path inside the bundle, `attestors/<name>.wasm`.
    pub path: String,
    /// Lowercase hex SHA-256 of the module; `bundle build` fills it in.
    #[serde(default)]
    pub sha256: String,
    /// JSON Schema of the module's configuration, for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_schema: Option<Value>,
    /// Host capabilities granted: any of `crypto`, `clock`, `log`. A module
    /// importing one it was not granted is refused at load.
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// The `.manifest`, OPA's fields plus `attestors`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub roots: Vec<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attestors: Vec<AttestorEntry>,
}

/// A bundle's files in memory, by path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bundle {
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Checks a path from an archive or directory: relative, no `..`, no empty
/// segments; returns it with `/` separators.
fn clean_path(raw: &str) -> Result<String, BundleError> {
    let p = raw.trim_start_matches("./");
    if p.is_empty()
        || p.starts_with('/')
        || p.contains('\\')
        || p.split('/').any(|s| s.is_empty() || s == "..")
    {
        return Err(BundleError::Path(raw.chars().take(120).collect()));
    }
    Ok(p.to_owned())
}

impl Bundle {
    /// Reads a bundle directory (every regular file below it; dotfiles other
    /// than `.manifest` and `.signatures.json` are skipped).
    pub fn from_dir(dir: &Path) -> Result<Self, BundleError> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), BundleError> {
            let entries =
                std::fs::read_dir(dir).map_err(|e| BundleError::Io(format!("{}: {e}", dir.display())))?;
            for entry in entries {
                let entry = entry.map_err(|e| BundleError::Io(e.to_string()))?;
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let kind = entry.file_type().map_err(|e| BundleError::Io(e.to_string()))?;
                if name.starts_with('.') && name != ".manifest" && name != SIGNATURES_FILE {
                    continue;
                }
                if kind.is_dir() {
                    walk(root, &path, out)?;
                } else if kind.is_file() {
                    let rel = path
                        .strip_prefix(root)
                        .map_err(|e| BundleError::Io(e.to_string()))?;
                    let rel = clean_path(&rel.to_string_lossy())?;
                    let bytes = std::fs::read(&path)
                        .map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
                    out.insert(rel, bytes);
                    if out.len() > MAX_FILES {
                        return Err(BundleError::TooLarge(format!("more than {MAX_FILES} files")));
                    }
                } else {
                    return Err(BundleError::Path(format!(
                        "{} is not a regular file",
                        path.display()
                    )));
                }
            }
            Ok(())
        }
        let mut files = BTreeMap::new();
        walk(dir, dir, &mut files)?;
        Ok(Self { files })
    }

    /// Unpacks a gzipped tarball, refusing links, unsafe paths and bombs.
    pub fn from_tar_gz(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(format!(
                "more than {MAX_BUNDLE_BYTES} bytes compressed"
            )));
        }
        let gz = flate2::read::GzDecoder::new(bytes).take(MAX_UNPACKED_BYTES + 1);
        let mut archive = tar::Archive::new(gz);
        let mut files = BTreeMap::new();
        let mut total: u64 = 0;
        for entry in archive
            .entries()
            .map_err(|e| BundleError::Archive(e.to_string()))?
        {
            let mut entry = entry.map_err(|e| BundleError::Archive(e.to_string()))?;
            let kind = entry.header().entry_type();
            let path = entry
                .path()
                .map_err(|e| BundleError::Archive(e.to_string()))?
                .to_string_lossy()
                .into_owned();
            if kind.is_dir() {
                continue;
            }
            if !kind.is_file() {
                return Err(BundleError::Path(format!("{path} is not a regular file")));
            }
            let path = clean_path(&path)?;
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| BundleError::Archive(e.to_string()))?;
            total += data.len() as u64;
            if total > MAX_UNPACKED_BYTES {
                return Err(BundleError::TooLarge(format!(
                    "more than {MAX_UNPACKED_BYTES} bytes unpacked"
                )));
            }
            if files.insert(path.clone(), data).is_some() {
                return Err(BundleError::Path(format!("{path} appears twice")));
            }
            if files.len() > MAX_FILES {
                return Err(BundleError::TooLarge(format!("more than {MAX_FILES} files")));
            }
        }
        if files.is_empty() {
            return Err(BundleError::Archive("the archive is empty".into()));
        }
        Ok(Self { files })
    }

    /// Packs the bundle as a gzipped tarball (sorted, fixed metadata, so the
    /// same files always give the same bytes).
    pub fn to_tar_gz(&self) -> Result<Vec<u8>, BundleError> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut builder = tar::Builder::new(gz);
        for (path, data) in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            builder
                .append_data(&mut header, path, data.as_slice())
                .map_err(|e| BundleError::Archive(e.to_string()))?;
        }
        let gz = builder
            .into_inner()
            .map_err(|e| BundleError::Archive(e.to_string()))?;
        gz.finish().map_err(|e| BundleError::Archive(e.to_string()))
    }

    /// The parsed `.manifest`.
    pub fn manifest(&self) -> Result<Manifest, BundleError> {
        // As in OPA, a bundle without a manifest has no revision and owns
        // every root.
        match self.files.get(".manifest") {
            None => Ok(Manifest::default()),
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest(e.to_string())),
        }
    }

    /// Checks the manifest against the files: roots well-formed and
    /// non-overlapping, every module listed exactly once with a matching
    /// hash and known capabilities, no unlisted modules.
    pub fn check(&self) -> Result<Manifest, BundleError> {
        let m = self.manifest()?;
        for (i, a) in m.roots.iter().enumerate() {
            if a.is_empty() || a.starts_with('/') || a.ends_with('/') {
                return Err(BundleError::Manifest(format!(
                    "root `{a}` must be a non-empty path without leading or trailing `/`"
                )));
            }
            for b in &m.roots[i + 1..] {
                if roots_overlap(a, b) {
                    return Err(BundleError::Manifest(format!("roots `{a}` and `{b}` overlap")));
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &m.attestors {
            if !seen.insert(a.method.clone()) {
                return Err(BundleError::Manifest(format!(
                    "method `{}` is listed twice",
                    a.method
                )));
            }
            if !a.path.starts_with("attestors/") || !a.path.ends_with(".wasm") {
                return Err(BundleError::Manifest(format!(
                    "module path `{}` must be attestors/<name>.wasm",
                    a.path
                )));
            }
            let bytes = self
                .files
                .get(&a.path)
                .ok_or_else(|| BundleError::Manifest(format!("module `{}` is missing", a.path)))?;
            if a.sha256 != crate::util::sha256_hex(bytes) {
                return Err(BundleError::Integrity(format!(
                    "module `{}` does not match its sha256 in the manifest",
                    a.path
                )));
            }
            if let Some(c) = a
                .capabilities
                .iter()
                .find(|c| !CAPABILITIES.contains(&c.as_str()))
            {
                return Err(BundleError::Manifest(format!(
                    "module `{}` asks for unknown capability `{c}` (known: {})",
                    a.path,
                    CAPABILITIES.join(", ")
                )));
            }
        }
        if let Some(extra) = self
            .files
            .keys()
            .find(|p| p.starts_with("attestors/") && !m.attestors.iter().any(|a| &a.path == *p))
        {
            return Err(BundleError::Manifest(format!(
                "`{extra}` is not listed in the manifest's attestors"
            )));
        }
        Ok(m)
    }

    /// The embedded default bundle: the policies compiled into the binary
    /// (its modules are the built-in attestors, which every snapshot has).
    pub fn embedded() -> Self {
        let mut files = BTreeMap::new();
        for (name, text) in crate::policy::embedded::FILES {
            files.insert((*name).to_owned(), text.as_bytes().to_vec());
        }
        Self { files }
    }

    /// Rego sources, by path.
    pub fn rego(&self) -> impl Iterator<Item = (&String, &Vec<u8>)> {
        self.files.iter().filter(|(p, _)| p.ends_with(".rego"))
    }
}

/// Whether two roots overlap: one is a path prefix of the other.
pub fn roots_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (a.trim_matches('/'), b.trim_matches('/'));
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// `bundle build`: reads a directory, fills in each module's sha256 in the
/// manifest, checks the result and compiles the Rego. Any existing signature
/// is dropped (the content changed).
pub fn build(dir: &Path) -> Result<Bundle, BundleError> {
    let mut bundle = Bundle::from_dir(dir)?;
    bundle.files.remove(SIGNATURES_FILE);
    let mut m = bundle.manifest()?;
    if !bundle.files.contains_key(".manifest") && bundle.files.keys().any(|p| p.starts_with("attestors/")) {
        return Err(BundleError::Manifest(
            "a bundle with attestor modules needs a .manifest listing them".into(),
        ));
    }
    for a in &mut m.attestors {
        let bytes = bundle
            .files
            .get(&a.path)
            .ok_or_else(|| BundleError::Manifest(format!("module `{}` is missing", a.path)))?;
        a.sha256 = crate::util::sha256_hex(bytes);
    }
    let text = serde_json::to_vec_pretty(&m).map_err(|e| BundleError::Manifest(e.to_string()))?;
    bundle.files.insert(".manifest".into(), text);
    bundle.check()?;
    Ok(bundle)
}

/// SHA-256 of a file as OPA hashes it: JSON files (and `.manifest`) over
/// their canonical form (keys sorted, no whitespace), others over the bytes.
pub fn file_hash(path: &str, bytes: &[u8]) -> Result<String, BundleError> {
    if path.ends_with(".json") || path.ends_with(".manifest") {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| BundleError::Integrity(format!("{path} is not JSON: {e}")))?;
        // serde_json's map is a BTreeMap here (no `preserve_order`), so this
        // serialisation has sorted keys and no insignificant whitespace.
        return Ok(crate::util::sha256_hex(v.to_string().as_bytes()));
    }
    Ok(crate::util::sha256_hex(bytes))
}

#[cfg(test)]
mod tests;
