//! The bundles a gateway serves, by name, merged into one active snapshot.
//! Activation is all or nothing: verify → check manifest and roots →
//! compile Rego → compile modules (capabilities checked) → swap. On any
//! error the running snapshot stays and the caller hears why.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{Bundle, BundleError, Manifest, roots_overlap};
use crate::attest::{Attestors, ModuleSet};
use crate::policy::{BundleFiles, BundleInfo, Policies, PolicyError};

/// Why a bundle was not activated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationError {
    /// The bundle itself is invalid or its signature does not verify.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// It conflicts with another active bundle.
    #[error("{0}")]
    Conflict(String),
    /// Its Rego does not compile or cannot decide.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A module does not compile or imports what it was not granted.
    #[error("{0}")]
    Module(String),
    /// The bundle could not be kept in the store for the other gateways.
    #[error("the bundle could not be stored: {0}")]
    Store(String),
}

struct Named {
    bundle: Bundle,
    manifest: Manifest,
    signed: bool,
    activated_at: String,
    /// The bundle the operator started the server with: it may replace
    /// built-in methods.
    initial: bool,
}

/// The named bundles behind the active snapshot.
pub struct Bundles {
    attestors: Arc<Attestors>,
    policies: Arc<Policies>,
    named: Mutex<BTreeMap<String, Named>>,
    /// SHA-256 of each stored (API-pushed) bundle active here, by name.
    stored: Mutex<BTreeMap<String, String>>,
    /// Methods other bundles may replace (`[bundles] replaceable_methods`).
    replaceable: Vec<String>,
}

impl Bundles {
    /// Starts from one bundle (the embedded default or a directory) and
    /// returns the manager and the policies holding its snapshot.
    pub fn start(
        attestors: Arc<Attestors>,
        name: &str,
        bundle: Bundle,
        logger: Option<Arc<crate::policy::DecisionLogger>>,
    ) -> Result<(Self, Arc<Policies>), ActivationError> {
        let manifest = bundle.check()?;
        let mut named = BTreeMap::new();
        named.insert(
            name.to_owned(),
            Named {
                bundle,
                manifest,
                signed: false,
                activated_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
                initial: true,
            },
        );
        let snapshot = build(&attestors, &named, &[])?;
        let policies = Arc::new(Policies::with_logger(snapshot, logger));
        Ok((
            Self {
                attestors,
                policies: policies.clone(),
                named: Mutex::new(named),
                stored: Mutex::new(BTreeMap::new()),
                replaceable: Vec::new(),
            },
            policies,
        ))
    }

    /// Lets later bundles replace these methods (built in, or served by the
    /// initial bundle).
    pub fn with_replaceable_methods(mut self, methods: Vec<String>) -> Self {
        self.replaceable = methods;
        self
    }

    /// Adds or replaces the bundle `name` and activates the result.
    pub fn put(&self, name: &str, bundle: Bundle, signed: bool) -> Result<BundleInfo, ActivationError> {
        self.put_then(name, bundle, signed, |_| Ok(()))
    }

    /// Like [`Bundles::put`], and runs `keep` once the new snapshot has
    /// compiled and before it is swapped in: if `keep` fails, nothing
    /// changes.
    pub fn put_then(
        &self,
        name: &str,
        bundle: Bundle,
        signed: bool,
        keep: impl FnOnce(&BundleInfo) -> Result<(), ActivationError>,
    ) -> Result<BundleInfo, ActivationError> {
        let result = self.activate_named(name, bundle, signed, keep);
        if result.is_err() {
            crate::metrics::get().bundle_activation_failures.inc();
        }
        result
    }

    fn activate_named(
        &self,
        name: &str,
        bundle: Bundle,
        signed: bool,
        keep: impl FnOnce(&BundleInfo) -> Result<(), ActivationError>,
    ) -> Result<BundleInfo, ActivationError> {
        if !crate::auth::valid_name(name) {
            return Err(ActivationError::Conflict(format!(
                "bundle name `{}` must be 1-64 letters, digits, `-`, `_`, `.`",
                name.chars().take(64).collect::<String>()
            )));
        }
        let manifest = bundle.check()?;
        let mut named = self.named.lock().unwrap_or_else(|p| p.into_inner());
        for (other, n) in named.iter().filter(|(o, _)| o.as_str() != name) {
            for a in &manifest.roots {
                if let Some(b) = n.manifest.roots.iter().find(|b| roots_overlap(a, b)) {
                    return Err(ActivationError::Conflict(format!(
                        "root `{a}` overlaps root `{b}` of bundle `{other}`"
                    )));
                }
            }
            if manifest.roots.is_empty() || n.manifest.roots.is_empty() {
                return Err(ActivationError::Conflict(format!(
                    "bundle `{other}` is active: every bundle must declare its roots"
                )));
            }
        }
        let mut next: BTreeMap<String, Named> = named
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Named {
                        bundle: v.bundle.clone(),
                        manifest: v.manifest.clone(),
                        signed: v.signed,
                        activated_at: v.activated_at.clone(),
                        initial: v.initial,
                    },
                )
            })
            .collect();
        next.insert(
            name.to_owned(),
            Named {
                bundle,
                manifest,
                signed,
                activated_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
                initial: false,
            },
        );
        let snapshot = build(&self.attestors, &next, &self.replaceable)?;
        let info = snapshot
            .bundles
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .ok_or_else(|| ActivationError::Conflict("activated bundle vanished".into()))?;
        keep(&info)?;
        self.policies.activate(snapshot);
        *named = next;
        Ok(info)
    }

    /// The SHA-256 of the stored bundle `name` active here, if any.
    pub fn stored_sha256(&self, name: &str) -> Option<String> {
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Records that the stored bundle `name` with this digest is active here.
    pub fn mark_stored(&self, name: &str, sha256: &str) {
        self.stored
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), sha256.to_owned());
    }

    /// What is active.
    pub fn list(&self) -> Vec<BundleInfo> {
        self.policies.snapshot().bundles.clone()
    }
}

/// Compiles the named bundles into one snapshot. A bundle other than the
/// initial one may replace a method already served only if `replaceable`
/// names it.
fn build(
    attestors: &Attestors,
    named: &BTreeMap<String, Named>,
    replaceable: &[String],
) -> Result<crate::policy::Loaded, ActivationError> {
    let mut files = BundleFiles {
        manifest: None,
        rego: Vec::new(),
        data: None,
    };
    let mut data = Value::Object(Default::default());
    let mut modules: ModuleSet = attestors.builtin().clone();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut infos = Vec::new();
    for (name, n) in named {
        for (path, bytes) in n.bundle.rego().filter(|(p, _)| !p.ends_with("_test.rego")) {
            let text = String::from_utf8(bytes.clone())
                .map_err(|_| BundleError::Manifest(format!("{path} is not UTF-8")))?;
            check_package_root(&text, &n.manifest.roots, path)?;
            files.rego.push((format!("{name}/{path}"), text));
        }
        for (path, bytes) in n.bundle.files.iter().filter(|(p, _)| p.ends_with("data.json")) {
            let v: Value =
                serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest(format!("{path}: {e}")))?;
            // `a/b/data.json` holds data at `a.b`, as in OPA.
            let mut doc = v;
            for seg in path
                .trim_end_matches("data.json")
                .trim_end_matches('/')
                .split('/')
                .filter(|s| !s.is_empty())
                .rev()
            {
                doc = serde_json::json!({ seg: doc });
            }
            check_data_roots(&doc, &n.manifest.roots, path)?;
            merge(&mut data, doc, path)?;
        }
        let mut methods = Vec::new();
        for entry in &n.manifest.attestors {
            if let Some(prev) = owner.get(&entry.method) {
                return Err(ActivationError::Conflict(format!(
                    "method `{}` is served by bundles `{prev}` and `{name}`",
                    entry.method
                )));
            }
            if !n.initial && modules.contains_key(&entry.method) && !replaceable.contains(&entry.method) {
                return Err(ActivationError::Conflict(format!(
                    "bundle `{name}` would replace method `{}`, which Castellan already serves; \
                     a bundle may replace a method only if `[bundles] replaceable_methods` lists it",
                    entry.method
                )));
            }
            let bytes = n
                .bundle
                .files
                .get(&entry.path)
                .ok_or_else(|| BundleError::Manifest(format!("{} is missing", entry.path)))?;
            let module = attestors
                .compile(&entry.method, bytes, &entry.capabilities)
                .map_err(|e| ActivationError::Module(e.to_string()))?;
            modules.insert(entry.method.clone(), module);
            owner.insert(entry.method.clone(), name.clone());
            methods.push(entry.method.clone());
        }
        infos.push(BundleInfo {
            name: name.clone(),
            revision: n.manifest.revision.clone(),
            roots: n.manifest.roots.clone(),
            signed: n.signed,
            attestors: methods,
            activated_at: n.activated_at.clone(),
        });
    }
    if named.len() == 1
        && let Some(n) = named.values().next()
    {
        files.manifest = serde_json::to_string(&n.manifest).ok();
    }
    files.data = Some(data.to_string());
    Ok(crate::policy::compile(&files, modules, infos)?)
}

/// A Rego file's package must sit under one of its bundle's roots. The
/// package is the one the Rego parser reads, never a guess from the text.
fn check_package_root(text: &str, roots: &[String], path: &str) -> Result<(), BundleError> {
    let mut parser = regorus::Engine::new();
    let package = parser
        .add_policy(path.to_owned(), text.to_owned())
        .map_err(|e| BundleError::Manifest(format!("{path}: {e}")))?;
    if roots.is_empty() {
        return Ok(());
    }
    let package = package
        .strip_prefix("data.")
        .unwrap_or(&package)
        .replace('.', "/");
    if under_roots(&package, roots) {
        Ok(())
    } else {
        Err(BundleError::Manifest(format!(
            "{path}: package `{}` is outside the bundle's roots",
            package.replace('/', ".")
        )))
    }
}

/// Whether a `/`-separated path is one of `roots` or below one.
fn under_roots(path: &str, roots: &[String]) -> bool {
    roots
        .iter()
        .any(|r| path == r || path.starts_with(&format!("{r}/")))
}

/// Every value a data document sets must sit under one of the bundle's
/// roots: objects above a root are walked, anything else is refused.
fn check_data_roots(doc: &Value, roots: &[String], path: &str) -> Result<(), BundleError> {
    fn walk(at: &str, v: &Value, roots: &[String], path: &str) -> Result<(), BundleError> {
        if !at.is_empty() && under_roots(at, roots) {
            return Ok(());
        }
        let above_a_root = at.is_empty() || roots.iter().any(|r| r.starts_with(&format!("{at}/")));
        match v {
            Value::Object(o) if above_a_root => o.iter().try_for_each(|(k, child)| {
                let next = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}/{k}")
                };
                walk(&next, child, roots, path)
            }),
            _ => Err(BundleError::Manifest(format!(
                "{path}: data at `{}` is outside the bundle's roots",
                at.replace('/', ".")
            ))),
        }
    }
    if roots.is_empty() {
        return Ok(());
    }
    walk("", doc, roots, path)
}

/// Deep-merges `add` into `into`; two bundles setting the same leaf conflict.
fn merge(into: &mut Value, add: Value, path: &str) -> Result<(), BundleError> {
    match (into, add) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v, path)?,
                    None => {
                        a.insert(k, v);
                    }
                }
            }
            Ok(())
        }
        _ => Err(BundleError::Manifest(format!(
            "{path} sets data another bundle already sets"
        ))),
    }
}
