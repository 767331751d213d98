//! Policy: Rego (regorus) decides over verified attestations. This module
//! owns loading a bundle (embedded or from a directory), the compiled template
//! engine behind an atomic swap (cloned per evaluation), the decision shapes,
//! and running a bundle's `test_` rules. Policies never do crypto.

mod decision_log;
mod memo;
mod tester;

pub use decision_log::DecisionLogger;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::model::policy::{
    ApprovalRule, BrokerDecision, BrokerInput, CaAsk, CaDecision, CaInput, EmergencyRule, EphemeralDecision,
    EphemeralInput, EphemeralOutcome, INPUT_VERSION, IssuanceDecision, IssuanceInput, WorkloadDecision,
    WorkloadInput,
};
pub use tester::{TestOutcome, TestReport, run_tests};

/// The default bundle compiled into the binary.
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_policies.rs"));
}

/// The rule attested issuance evaluates.
pub const ISSUANCE_RULE: &str = "data.castellan.issuance.decision";

/// The rule ephemeral (approval-gated) issuance evaluates.
pub const EPHEMERAL_RULE: &str = "data.castellan.ephemeral.decision";

/// The rule the Workload API evaluates for each SVID it would hand out.
pub const WORKLOAD_RULE: &str = "data.castellan.workload_api.decision";

/// The rule the agent broker evaluates.
pub const BROKER_RULE: &str = "data.castellan.broker.decision";

/// Why a bundle could not be loaded or a decision not made. Every variant on
/// the issuance path means no credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A bundle file could not be read.
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    /// The bundle's `.manifest` is invalid.
    #[error("bundle manifest: {0}")]
    Manifest(String),
    /// A Rego file does not parse or compile.
    #[error("rego {file}: {message}")]
    Compile { file: String, message: String },
    /// `data.json` is not a JSON object.
    #[error("data.json: {0}")]
    Data(String),
    /// Evaluation failed (runtime error, timeout).
    #[error("policy evaluation failed: {0}")]
    Eval(String),
    /// The decision document is missing or has the wrong shape.
    #[error("policy returned no valid decision: {0}")]
    BadDecision(String),
}

/// A bundle's `.manifest` (OPA layout).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Manifest {
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub roots: Vec<String>,
    #[serde(default)]
    pub metadata: Value,
}

/// Rules the gateway evaluates; each is compiled once when a bundle loads.
pub const ENTRYPOINTS: &[&str] = &[ISSUANCE_RULE, EPHEMERAL_RULE, BROKER_RULE, WORKLOAD_RULE, CA_RULE];

/// Entry point for subordinate CAs Castellan signs (an upstream authority).
pub const CA_RULE: &str = "data.castellan.ca.decision";

/// What one loaded bundle contributes, as `GET /api/v1/bundles` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleInfo {
    pub name: String,
    pub revision: String,
    pub roots: Vec<String>,
    /// Whether its signature was verified (embedded and dev bundles are not signed).
    pub signed: bool,
    /// Attestation methods its modules serve.
    pub attestors: Vec<String>,
    pub activated_at: String,
}

/// Everything a request decides with: the compiled policies and the
/// attestor modules of the active bundles. Swapped whole: a request takes
/// one snapshot and uses it throughout, so it never sees half a bundle.
pub struct Loaded {
    /// The engine with every module and the data, for tests and tooling.
    engine: regorus::Engine,
    /// One prepared policy per entry point: evaluating one builds a cheap
    /// engine over shared, already-analysed modules.
    compiled: Vec<(&'static str, regorus::CompiledPolicy)>,
    manifest: Manifest,
    /// Attestor modules by method: the built-ins, plus and over them the
    /// bundles' own.
    pub modules: crate::attest::ModuleSet,
    /// The bundles this snapshot was built from.
    pub bundles: Vec<BundleInfo>,
    /// Where decisions are logged, when enabled.
    logger: Option<Arc<DecisionLogger>>,
    /// Decisions already made by this snapshot, by (entry point, input), when
    /// its policies are deterministic (see [`memo::is_deterministic`]).
    memo: Option<memo::Memo>,
}

/// The active snapshot; swapped whole, never mutated in place.
pub struct Policies {
    active: ArcSwap<Loaded>,
    logger: Option<Arc<DecisionLogger>>,
}

/// Source files of a bundle: (name, text).
pub struct BundleFiles {
    pub manifest: Option<String>,
    pub rego: Vec<(String, String)>,
    pub data: Option<String>,
}

impl BundleFiles {
    /// The embedded default bundle.
    pub fn embedded() -> Self {
        let mut files = Self {
            manifest: None,
            rego: Vec::new(),
            data: None,
        };
        for (name, text) in embedded::FILES {
            match *name {
                ".manifest" => files.manifest = Some((*text).to_owned()),
                "data.json" => files.data = Some((*text).to_owned()),
                _ => files.rego.push(((*name).to_owned(), (*text).to_owned())),
            }
        }
        files
    }

    /// The policy part of a bundle's files: its `.manifest`, Rego (tests
    /// excluded) and `data.json`, by file name.
    pub fn from_files<'a>(
        files: impl IntoIterator<Item = (&'a String, &'a Vec<u8>)>,
    ) -> Result<Self, PolicyError> {
        let text = |b: &Vec<u8>, name: &str| {
            String::from_utf8(b.clone()).map_err(|_| PolicyError::Read {
                path: name.into(),
                message: "not UTF-8".into(),
            })
        };
        let mut out = Self {
            manifest: None,
            rego: Vec::new(),
            data: None,
        };
        for (name, bytes) in files {
            if name == ".manifest" {
                out.manifest = Some(text(bytes, name)?);
            } else if name == "data.json" {
                out.data = Some(text(bytes, name)?);
            } else if name.ends_with(".rego") && !name.ends_with("_test.rego") {
                out.rego.push((name.clone(), text(bytes, name)?));
            }
        }
        if out.rego.is_empty() {
            return Err(PolicyError::Read {
                path: "bundle".into(),
                message: "no .rego files".into(),
            });
        }
        Ok(out)
    }

    /// Reads a bundle directory. `include_tests` adds `*_test.rego`.
    pub fn from_dir(dir: &Path, include_tests: bool) -> Result<Self, PolicyError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| PolicyError::Read {
                path: p.to_owned(),
                message: e.to_string(),
            })
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| PolicyError::Read {
                path: dir.to_owned(),
                message: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let mut files = Self {
            manifest: None,
            rego: Vec::new(),
            data: None,
        };
        for p in entries {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if name == ".manifest" {
                files.manifest = Some(read(&p)?);
            } else if name == "data.json" {
                files.data = Some(read(&p)?);
            } else if name.ends_with(".rego") && (include_tests || !name.ends_with("_test.rego")) {
                files.rego.push((name, read(&p)?));
            }
        }
        if files.rego.is_empty() {
            return Err(PolicyError::Read {
                path: dir.to_owned(),
                message: "no .rego files".into(),
            });
        }
        Ok(files)
    }

    /// Checks that the Rego compiles and the data parses, without requiring
    /// the bundle to decide anything by itself (it may be one part of several).
    pub fn check_compiles(&self) -> Result<(), PolicyError> {
        self.compile().map(drop)
    }

    /// Compiles the bundle into an engine.
    fn compile(&self) -> Result<Loaded, PolicyError> {
        let manifest: Manifest = match &self.manifest {
            Some(m) => serde_json::from_str(m).map_err(|e| PolicyError::Manifest(e.to_string()))?,
            None => Manifest::default(),
        };
        let mut engine = regorus::Engine::new();
        // A builtin that errors (bad regex, type error) is an error, not undefined.
        engine.set_strict_builtin_errors(true);
        for (name, text) in &self.rego {
            engine
                .add_policy(name.clone(), text.clone())
                .map_err(|e| PolicyError::Compile {
                    file: name.clone(),
                    message: e.to_string(),
                })?;
        }
        if let Some(data) = &self.data {
            let value: Value = serde_json::from_str(data).map_err(|e| PolicyError::Data(e.to_string()))?;
            if !value.is_object() {
                return Err(PolicyError::Data("must be a JSON object".into()));
            }
            engine
                .add_data(regorus::Value::from(value))
                .map_err(|e| PolicyError::Data(e.to_string()))?;
        }
        let packages = engine
            .get_packages()
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        let mut compiled = Vec::with_capacity(ENTRYPOINTS.len());
        for rule in ENTRYPOINTS {
            // A bundle may leave a surface out; that surface then refuses.
            let package = rule.trim_end_matches(".decision");
            if !packages.iter().any(|p| p == package) {
                continue;
            }
            let policy = engine
                .clone()
                .compile_with_entrypoint(&(*rule).into())
                .map_err(|e| {
                    PolicyError::BadDecision(format!("entry point `{rule}` does not compile: {e}"))
                })?;
            compiled.push((*rule, policy));
        }
        let deterministic = self.rego.iter().all(|(_, text)| memo::is_deterministic(text));
        Ok(Loaded {
            engine,
            compiled,
            manifest,
            modules: Default::default(),
            bundles: Vec::new(),
            logger: None,
            memo: deterministic.then(memo::Memo::default),
        })
    }
}

/// Sets the wall-clock budget of every policy evaluation in this process.
/// regorus checks it cooperatively; an evaluation past it returns an error,
/// which fails the request closed.
pub fn set_eval_deadline(deadline: std::time::Duration) {
    regorus::utils::limits::set_fallback_execution_timer_config(Some(
        regorus::utils::limits::ExecutionTimerConfig {
            limit: deadline,
            check_interval: std::num::NonZeroU32::MIN.saturating_add(63),
        },
    ));
}

impl Loaded {
    /// The revision of the active bundles (`name=revision` when several).
    pub fn revision(&self) -> String {
        match self.bundles.as_slice() {
            [] => self.manifest.revision.clone(),
            [one] => one.revision.clone(),
            many => many
                .iter()
                .map(|b| format!("{}={}", b.name, b.revision))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Attestation methods with a module, sorted.
    pub fn methods(&self) -> Vec<String> {
        let mut m: Vec<_> = self.modules.keys().cloned().collect();
        m.sort();
        m
    }

    /// A load-time check that the bundle decides something and that the
    /// issuance entry point, when present, evaluates on a minimal input.
    fn smoke_test(&self) -> Result<(), PolicyError> {
        if self.compiled.is_empty() {
            return Err(PolicyError::BadDecision(format!(
                "the bundle defines none of {}",
                ENTRYPOINTS.join(", ")
            )));
        }
        if !self.compiled.iter().any(|(r, _)| *r == ISSUANCE_RULE) {
            return Ok(());
        }
        let input = serde_json::json!({
            "version": 1,
            "trust_domain": "example.org",
            "attestation": {"method": "", "subject": "", "selectors": [], "claims": {}},
            "request": {"ttl_seconds": null, "dns_names": []},
        });
        self.eval(ISSUANCE_RULE, &input).map(drop)
    }

    /// Evaluates the entry point `rule` with `input`. Blocking: call from a
    /// blocking thread.
    pub fn eval(&self, rule: &str, input: &Value) -> Result<Value, PolicyError> {
        let _timer = crate::metrics::StageTimer::start("decide");
        let (_, policy) = self.compiled.iter().find(|(r, _)| *r == rule).ok_or_else(|| {
            PolicyError::BadDecision(format!(
                "the policy bundle has no `{}` package",
                rule.trim_start_matches("data.").trim_end_matches(".decision")
            ))
        })?;
        let result = policy
            .eval_with_input(regorus::Value::from(input.clone()))
            .map_err(|e| PolicyError::Eval(e.to_string()))?;
        if result == regorus::Value::Undefined {
            return Ok(Value::Null);
        }
        serde_json::to_value(&result).map_err(|e| PolicyError::Eval(e.to_string()))
    }

    /// Evaluates `rule` over a typed input, logs the decision when decision
    /// logs are on, and checks the decision's shape. Blocking.
    fn decide<T: serde::de::DeserializeOwned>(
        &self,
        rule: &str,
        input: &impl Serialize,
    ) -> Result<T, PolicyError> {
        let input = serde_json::to_value(input).map_err(|e| PolicyError::Eval(e.to_string()))?;
        // With decision logs on, every evaluation is logged: nothing is reused.
        let memo = self.memo.as_ref().filter(|_| self.logger.is_none());
        let key = memo.map(|_| memo::key(rule, &input));
        let remembered = memo.zip(key.as_ref()).and_then(|(m, k)| m.get(k));
        let value = match remembered {
            Some(v) => v,
            None => {
                let v = self.eval(rule, &input)?;
                if let (Some(m), Some(k)) = (memo, key) {
                    m.put(k, &v);
                }
                v
            }
        };
        if let Some(logger) = &self.logger {
            logger.log(rule, &input, &value, &self.bundles);
        }
        if value.is_null() {
            return Err(PolicyError::BadDecision(format!("`{rule}` is undefined")));
        }
        serde_json::from_value(value).map_err(|e| PolicyError::BadDecision(e.to_string()))
    }

    /// The broker decision, shape checked.
    pub fn decide_broker(&self, input: &BrokerInput<'_>) -> Result<BrokerDecision, PolicyError> {
        self.decide(BROKER_RULE, input)
    }

    /// The ephemeral decision, shape checked.
    pub fn decide_ephemeral(&self, input: &EphemeralInput<'_>) -> Result<EphemeralDecision, PolicyError> {
        self.decide(EPHEMERAL_RULE, input)
    }

    /// The issuance decision, shape checked.
    pub fn decide_issuance(&self, input: &IssuanceInput<'_>) -> Result<IssuanceDecision, PolicyError> {
        self.decide(ISSUANCE_RULE, input)
    }

    /// The subordinate CA decision, shape checked.
    pub fn decide_ca(&self, input: &CaInput<'_>) -> Result<CaDecision, PolicyError> {
        self.decide(CA_RULE, input)
    }

    /// The Workload API decision for one entry, shape checked.
    pub fn decide_workload(&self, input: &WorkloadInput<'_>) -> Result<WorkloadDecision, PolicyError> {
        self.decide(WORKLOAD_RULE, input)
    }
}

/// Compiles policy files and modules into a snapshot, checked but not active.
pub fn compile(
    files: &BundleFiles,
    modules: crate::attest::ModuleSet,
    bundles: Vec<BundleInfo>,
) -> Result<Loaded, PolicyError> {
    let mut loaded = files.compile()?;
    loaded.modules = modules;
    loaded.bundles = bundles;
    loaded.smoke_test()?;
    Ok(loaded)
}

impl Policies {
    /// Compiles a bundle (without modules) and checks that it can decide.
    pub fn load(files: &BundleFiles) -> Result<Self, PolicyError> {
        Ok(Self::from_snapshot(compile(
            files,
            Default::default(),
            Vec::new(),
        )?))
    }

    /// Starts from a compiled snapshot.
    pub fn from_snapshot(loaded: Loaded) -> Self {
        Self::with_logger(loaded, None)
    }

    /// Starts from a compiled snapshot, logging every decision to `logger`.
    pub fn with_logger(mut loaded: Loaded, logger: Option<Arc<DecisionLogger>>) -> Self {
        loaded.logger = logger.clone();
        Self {
            active: ArcSwap::from_pointee(loaded),
            logger,
        }
    }

    /// The embedded default bundle.
    pub fn embedded() -> Result<Self, PolicyError> {
        Self::load(&BundleFiles::embedded())
    }

    /// Makes `loaded` the active snapshot. Requests in flight keep the one
    /// they took.
    pub fn activate(&self, mut loaded: Loaded) {
        loaded.logger = self.logger.clone();
        self.active.store(Arc::new(loaded));
    }

    /// The active snapshot: take it once per request.
    pub fn snapshot(&self) -> Arc<Loaded> {
        self.active.load_full()
    }

    /// The active bundles' revision.
    pub fn revision(&self) -> String {
        self.active.load().revision()
    }

    /// Evaluates an entry point on the active snapshot.
    pub fn eval(&self, rule: &str, input: &Value) -> Result<Value, PolicyError> {
        self.active.load().eval(rule, input)
    }
}

/// Shared handle to the active policies.
pub type SharedPolicies = Arc<Policies>;

#[cfg(test)]
mod tests;
