//! Attestation: runs the attestor module for a request's method over its
//! evidence, in a wasmtime sandbox, and returns what the module proved.
//!
//! Each call gets a fresh instance from a pooling allocator (a trapped
//! instance is thrown away with its store), an epoch deadline and memory
//! limits. Modules are compiled once at load and instantiated from an
//! `InstancePre`. The only host capabilities linked are the Castellan
//! interfaces (`crypto`, `clock`, `log`): a module that imports anything else
//! — WASI filesystem, sockets, environment — fails to load.

mod host;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder,
};

use crate::config::SandboxConfig;
pub use crate::model::{Attestation, SingleUse};
use crate::trust::Snapshot;

mod bindings {
    wasmtime::component::bindgen!({
        world: "attestor",
        path: "../plugins-wasm/wit",
    });
}

pub use bindings::castellan::attestor::types::AttestError as ModuleError;

/// The built-in modules compiled into the binary.
pub mod challenge;
pub mod replay;

pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_attestors.rs"));
}

/// Misbehaving modules for the sandbox tests; not in the binary.
#[cfg(test)]
#[allow(dead_code)] // the end-to-end tests use the rest
mod fixtures {
    include!(concat!(env!("OUT_DIR"), "/test_fixtures.rs"));
}

/// Largest attestation a module may return: a subject, selectors and claims
/// beyond these are a module fault, not data to carry into policy and audit.
const MAX_SUBJECT_BYTES: usize = 1024;
const MAX_SELECTORS: usize = 256;
const MAX_SELECTOR_BYTES: usize = 1024;
const MAX_CLAIMS_BYTES: usize = 64 * 1024;

/// Bytes of each linear memory kept resident between calls (see `new`).
const KEEP_RESIDENT_BYTES: usize = 512 << 10;

/// Methods whose evidence the host gathers itself (e.g. from the kernel),
/// so no trust source is involved.
pub const HOST_EVIDENCE_METHODS: &[&str] = &["unix"];

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The claim modules set through the SDK's `Attestation::single_use`.
const SINGLE_USE_CLAIM: &str = "_single_use";

/// Why attestation did not produce an [`Attestation`]. Every variant means
/// no credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// No module handles this method.
    #[error("unknown attestation method `{0}`")]
    UnknownMethod(String),
    /// The method has no trust source that fits.
    #[error("{0}")]
    NoTrustSource(String),
    /// The evidence could not be parsed.
    #[error("malformed evidence: {0}")]
    Malformed(String),
    /// The evidence did not verify.
    #[error("{0}")]
    Rejected(String),
    /// The module's configuration is unusable.
    #[error("attestor configuration: {0}")]
    Config(String),
    /// The module trapped, ran out of time or memory, or returned nonsense.
    #[error("attestor module failed: {0}")]
    Module(String),
    /// A module could not be compiled or linked at load time.
    #[error("attestor module `{method}` cannot be loaded: {message}")]
    Load { method: String, message: String },
}

/// The per-call state a module's host functions see.
pub struct HostState {
    trust: Arc<Snapshot>,
    method: String,
    limits: StoreLimits,
    /// The trust sources' key and certificate sets the module verified
    /// against, in order, and how each check ended.
    used: Vec<SetUse>,
}

/// One verification a module asked the host for: the set it named (`ts:<id>`)
/// and the error, if the check failed.
#[derive(Debug, Clone)]
pub struct SetUse {
    pub set: String,
    pub error: Option<String>,
}

/// A compiled module, ready to instantiate.
pub struct Module {
    pre: bindings::AttestorPre<HostState>,
    /// The capabilities it imports (`crypto`, `clock`, `log`).
    pub capabilities: Vec<String>,
}

/// Modules by attestation method.
pub type ModuleSet = HashMap<String, Arc<Module>>;

/// The loaded attestor modules and the engine that runs them.
pub struct Attestors {
    engine: Engine,
    linker: Linker<HostState>,
    /// Precompiled artifacts on disk, when configured.
    cache: Option<ModuleCache>,
    /// The modules compiled into the binary; bundles may add or override.
    modules: ModuleSet,
    deadline_ticks: u64,
    max_memory_bytes: usize,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Attestors {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Attestors {
    /// Builds the engine and compiles `modules` (method, component bytes).
    pub fn new(config: &SandboxConfig, modules: &[(&str, &[u8])]) -> Result<Self, AttestError> {
        Self::with_cache_dir(config, modules, None)
    }

    /// Like [`Attestors::new`], keeping precompiled modules (built-in and
    /// from bundles) in `cache_dir` so later starts and activations skip
    /// compilation.
    pub fn with_cache_dir(
        config: &SandboxConfig,
        modules: &[(&str, &[u8])],
        cache_dir: Option<&std::path::Path>,
    ) -> Result<Self, AttestError> {
        let load_err = |message: String| AttestError::Load {
            method: "*".into(),
            message,
        };
        let mut pool = PoolingAllocationConfig::default();
        let n = config.max_instances;
        // A component instance is the module plus the small shim modules the
        // component model generates; size the pools with room for them.
        pool.total_component_instances(n);
        pool.total_core_instances(n * 4);
        pool.total_memories(n * 2);
        pool.total_tables(n * 4);
        pool.max_memory_size(config.max_memory_bytes);
        pool.max_memories_per_module(1);
        pool.max_tables_per_module(2);
        // Returning a slot's memory with one `madvise` per call makes the
        // kernel shoot down TLBs on every core each time; batching the
        // decommits amortises that across calls.
        pool.decommit_batch_size(16);
        // Keep the first pages of each slot mapped and reset them with
        // `memset`: a module's stack, data and small heap live there, and
        // re-faulting them on every call costs page faults and TLB flushes.
        pool.linear_memory_keep_resident(KEEP_RESIDENT_BYTES.min(config.max_memory_bytes));
        pool.table_keep_resident(64 << 10);
        let mut wasm = Config::new();
        wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        wasm.epoch_interruption(true);
        wasm.wasm_component_model(true);
        // Reserve only what a module may use; bounds checks cover the rest.
        wasm.memory_reservation(config.max_memory_bytes as u64);
        wasm.memory_guard_size(64 << 10);
        wasm.max_wasm_stack(512 << 10);
        // Copy data segments into the (resident) slot instead of mapping a
        // copy-on-write image, whose first write per page faults.
        wasm.memory_init_cow(false);
        let engine = Engine::new(&wasm).map_err(|e| load_err(e.to_string()))?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        bindings::Attestor::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| load_err(e.to_string()))?;

        let cache = cache_dir.map(|d| ModuleCache::open(d, &engine)).transpose()?;
        let mut loaded = HashMap::new();
        for (method, bytes) in modules {
            let module = compile_module(&engine, &linker, cache.as_ref(), method, bytes, None)?;
            loaded.insert((*method).to_owned(), module);
        }

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let (stop, ticking) = (ticker_stop.clone(), engine.clone());
        std::thread::Builder::new()
            .name("castellan-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking.increment_epoch();
                }
            })
            .map_err(|e| load_err(e.to_string()))?;

        let tick_ms = EPOCH_TICK.as_millis() as u64;
        Ok(Self {
            engine,
            linker,
            cache,
            modules: loaded,
            // +1: the first tick may come at once.
            deadline_ticks: config.deadline_ms.div_ceil(tick_ms) + 1,
            max_memory_bytes: config.max_memory_bytes,
            ticker_stop,
        })
    }

    /// The built-in modules.
    pub fn embedded(config: &SandboxConfig) -> Result<Self, AttestError> {
        Self::new(config, embedded::MODULES)
    }

    /// Whether a module handles `method`.
    pub fn has_method(&self, method: &str) -> bool {
        self.modules.contains_key(method)
    }

    /// Methods with a module, sorted.
    pub fn methods(&self) -> Vec<String> {
        let mut m: Vec<_> = self.modules.keys().cloned().collect();
        m.sort();
        m
    }

    /// Runs the module for `method`. Blocking: call from a blocking thread.
    pub fn attest(
        &self,
        method: &str,
        evidence: &str,
        trust: Arc<Snapshot>,
        context: &Value,
    ) -> Result<Attestation, AttestError> {
        self.attest_in(&self.modules, method, evidence, trust, context)
    }

    /// The modules compiled into the binary.
    pub fn builtin(&self) -> &ModuleSet {
        &self.modules
    }

    /// Compiles a module from a bundle, granting only `capabilities`: a
    /// module importing anything else (another Castellan capability, or any
    /// WASI interface) is refused.
    pub fn compile(
        &self,
        method: &str,
        bytes: &[u8],
        capabilities: &[String],
    ) -> Result<Arc<Module>, AttestError> {
        compile_module(
            &self.engine,
            &self.linker,
            self.cache.as_ref(),
            method,
            bytes,
            Some(capabilities),
        )
    }

    /// Runs the module for `method` from `modules`. Blocking.
    pub fn attest_in(
        &self,
        modules: &ModuleSet,
        method: &str,
        evidence: &str,
        trust: Arc<Snapshot>,
        context: &Value,
    ) -> Result<Attestation, AttestError> {
        self.attest_traced(modules, method, evidence, trust, context, &mut Vec::new())
    }

    /// [`Attestors::attest_in`], also noting in `used` the trust sources'
    /// sets the module verified against and how each check ended (what
    /// `explain` shows). Blocking.
    pub fn attest_traced(
        &self,
        modules: &ModuleSet,
        method: &str,
        evidence: &str,
        trust: Arc<Snapshot>,
        context: &Value,
        used: &mut Vec<SetUse>,
    ) -> Result<Attestation, AttestError> {
        let module = modules
            .get(method)
            .ok_or_else(|| AttestError::UnknownMethod(method.to_owned()))?;
        // Host-evidence methods (the evidence is what the kernel reported,
        // gathered by the host itself) need no trust source.
        if !HOST_EVIDENCE_METHODS.contains(&method) && !trust.has_method(method) {
            return Err(AttestError::NoTrustSource(format!(
                "no trust source is configured for `{method}`"
            )));
        }
        let config = trust.module_config(method).to_string();
        let limits = StoreLimitsBuilder::new()
            .memory_size(self.max_memory_bytes)
            .instances(8)
            .tables(8)
            .table_elements(10_000)
            .trap_on_grow_failure(true)
            .build();
        let mut store = Store::new(
            &self.engine,
            HostState {
                trust,
                method: method.to_owned(),
                limits,
                used: Vec::new(),
            },
        );
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(self.deadline_ticks);
        store.epoch_deadline_trap();

        let instance = module.pre.instantiate(&mut store).map_err(trap_text)?;
        let result = instance.call_attest(&mut store, evidence, &config, &context.to_string());
        *used = std::mem::take(&mut store.data_mut().used);
        let result = result.map_err(trap_text)?;
        // The store (and the instance in it) is dropped here, whatever happened.
        match result {
            Ok(a) => {
                if a.subject.is_empty() || a.subject.len() > MAX_SUBJECT_BYTES {
                    return Err(AttestError::Module(format!(
                        "returned a subject that is empty or over {MAX_SUBJECT_BYTES} bytes"
                    )));
                }
                if a.selectors.len() > MAX_SELECTORS
                    || a.selectors.iter().any(|s| s.len() > MAX_SELECTOR_BYTES)
                {
                    return Err(AttestError::Module(format!(
                        "returned more than {MAX_SELECTORS} selectors or one over {MAX_SELECTOR_BYTES} bytes"
                    )));
                }
                if a.claims_json.len() > MAX_CLAIMS_BYTES {
                    return Err(AttestError::Module(format!(
                        "returned claims over {MAX_CLAIMS_BYTES} bytes"
                    )));
                }
                let mut claims: Value = serde_json::from_str(&a.claims_json)
                    .map_err(|_| AttestError::Module("returned claims that are not JSON".into()))?;
                let Some(map) = claims.as_object_mut() else {
                    return Err(AttestError::Module(
                        "returned claims that are not a JSON object".into(),
                    ));
                };
                let single_use = match map.remove(SINGLE_USE_CLAIM) {
                    None => None,
                    Some(v) => match (v["id"].as_str(), v["until"].as_i64()) {
                        (Some(id), Some(until)) if !id.is_empty() && id.len() <= 512 => Some(SingleUse {
                            id: id.to_owned(),
                            until,
                        }),
                        _ => {
                            return Err(AttestError::Module(format!(
                                "returned a malformed `{SINGLE_USE_CLAIM}` claim"
                            )));
                        }
                    },
                };
                Ok(Attestation {
                    method: method.to_owned(),
                    subject: a.subject,
                    selectors: a.selectors,
                    claims,
                    single_use,
                })
            }
            Err(ModuleError::Malformed(m)) => Err(AttestError::Malformed(m)),
            Err(ModuleError::Rejected(m)) => Err(AttestError::Rejected(m)),
            Err(ModuleError::NoTrustSource(m)) => Err(AttestError::NoTrustSource(m)),
            Err(ModuleError::Config(m)) => Err(AttestError::Config(m)),
        }
    }
}

/// Compiles and links one component. Its imports are checked first: only
/// Castellan capabilities, and with `granted`, only those granted.
fn compile_module(
    engine: &Engine,
    linker: &Linker<HostState>,
    cache: Option<&ModuleCache>,
    method: &str,
    bytes: &[u8],
    granted: Option<&[String]>,
) -> Result<Arc<Module>, AttestError> {
    let fail = |message: String| AttestError::Load {
        method: method.to_owned(),
        message,
    };
    let component = match cache.and_then(|c| c.load(engine, bytes)) {
        Some(c) => c,
        None => {
            let c = Component::new(engine, bytes).map_err(|e| fail(format!("{e:#}")))?;
            if let Some(cache) = cache {
                cache.store(&c, bytes);
            }
            c
        }
    };
    let mut capabilities = Vec::new();
    for (name, _) in component.component_type().imports(engine) {
        let interface = name
            .strip_prefix("castellan:attestor/")
            .map(|rest| rest.split('@').next().unwrap_or(rest))
            .ok_or_else(|| fail(format!("imports `{name}`, which is not a Castellan capability")))?;
        if interface == "types" {
            continue;
        }
        if let Some(granted) = granted
            && !granted.iter().any(|g| g == interface)
        {
            return Err(fail(format!(
                "imports the `{interface}` capability, which its manifest entry does not grant"
            )));
        }
        capabilities.push(interface.to_owned());
    }
    let pre = linker
        .instantiate_pre(&component)
        .map_err(|e| fail(format!("{e:#}")))?;
    let pre = bindings::AttestorPre::new(pre).map_err(|e| fail(format!("{e:#}")))?;
    Ok(Arc::new(Module { pre, capabilities }))
}

/// Precompiled components on disk. An artifact is named by the module's
/// SHA-256 and the engine's compatibility hash, and carries an HMAC under a
/// key that never leaves the data directory: only artifacts this gateway
/// produced are ever deserialized.
struct ModuleCache {
    dir: std::path::PathBuf,
    key: ring::hmac::Key,
    engine_hash: String,
}

impl ModuleCache {
    fn open(dir: &std::path::Path, engine: &Engine) -> Result<Self, AttestError> {
        use std::hash::{Hash, Hasher};
        let err = |m: String| AttestError::Load {
            method: "*".into(),
            message: format!("module cache {}: {m}", dir.display()),
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err(e.to_string()))?;
        }
        let key_path = dir.join("cache.key");
        let key = match std::fs::read(&key_path) {
            Ok(k) if k.len() == 32 => k,
            _ => {
                let k: [u8; 32] = crate::util::random_bytes();
                crate::util::write_private_file(&key_path, &k).map_err(|e| err(e.to_string()))?;
                k.to_vec()
            }
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self {
            dir: dir.to_owned(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            engine_hash: format!("{:016x}", h.finish()),
        })
    }

    fn path(&self, bytes: &[u8]) -> std::path::PathBuf {
        self.dir.join(format!(
            "{}-{}.cwasm",
            crate::util::sha256_hex(bytes),
            self.engine_hash
        ))
    }

    /// The cached component for `bytes`, if present and authentic.
    fn load(&self, engine: &Engine, bytes: &[u8]) -> Option<Component> {
        let data = std::fs::read(self.path(bytes)).ok()?;
        let (artifact, tag) = data.split_at(data.len().checked_sub(32)?);
        ring::hmac::verify(&self.key, artifact, tag).ok()?;
        // SAFETY: `deserialize` trusts its input to be a wasmtime artifact
        // for this engine. The HMAC above proves this gateway wrote it (the
        // key never leaves the 0700 cache directory), and the file name
        // binds it to this engine's compatibility hash.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, artifact) };
        component.ok()
    }

    /// Writes `component` for `bytes`; failures only cost a recompile later.
    fn store(&self, component: &Component, bytes: &[u8]) {
        let Ok(mut artifact) = component.serialize() else {
            return;
        };
        let tag = ring::hmac::sign(&self.key, &artifact);
        artifact.extend_from_slice(tag.as_ref());
        let path = self.path(bytes);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &artifact).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

fn trap_text(e: wasmtime::Error) -> AttestError {
    let text = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => "exceeded its time limit".to_owned(),
        Some(wasmtime::Trap::StackOverflow) => "overflowed its stack".to_owned(),
        // With the stack at the bottom of linear memory, a module's own stack
        // overflow runs off the start of memory and lands here.
        Some(wasmtime::Trap::MemoryOutOfBounds) => {
            "accessed memory out of bounds (e.g. overflowed its stack)".to_owned()
        }
        Some(wasmtime::Trap::UnreachableCodeReached) => "trapped (panic or unreachable)".to_owned(),
        Some(t) => format!("trapped: {t}"),
        None => {
            let s = format!("{e:#}");
            if s.contains("memory") || s.contains("resource limit") {
                "exceeded its memory limit".to_owned()
            } else {
                format!("failed: {}", s.chars().take(200).collect::<String>())
            }
        }
    };
    AttestError::Module(text)
}

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
