//! Prometheus metrics: one process-wide registry, counted where things
//! happen and rendered in the text exposition format at `GET /metrics`.
//! Gauges that describe state (pending approvals, CA authorities' time
//! left, bundle revisions) are set when scraped, by the surface that serves
//! them. Labels never carry a secret or an unbounded value from a caller:
//! methods, flows, problem types, stages, routes as registered.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A credential's flow and attestation method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Flow {
    pub flow: String,
    pub method: String,
}

/// A refusal: its flow, method and problem type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refused {
    pub flow: String,
    pub method: String,
    pub reason: String,
}

/// A pipeline stage.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stage {
    pub stage: String,
}

/// An HTTP route as registered, and the answer's status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
    pub status: String,
}

/// A signing authority.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Authority {
    pub kind: String,
    pub id: String,
    pub state: String,
}

/// A policy bundle and its revision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Bundle {
    pub bundle: String,
    pub revision: String,
}

/// An outcome (delivered, failed, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

type Seconds = Family<Stage, Histogram, fn() -> Histogram>;

/// Every metric Castellan keeps.
pub struct Metrics {
    registry: Registry,
    pub issued: Family<Flow, Counter>,
    pub refused: Family<Refused, Counter>,
    pub stage_seconds: Seconds,
    pub http_seconds: Family<Route, Histogram, fn() -> Histogram>,
    pub store_commit_seconds: Histogram,
    pub pending_approvals: Gauge,
    pub workload_streams: Gauge,
    pub workload_pushes: Counter,
    pub bundle_revision: Family<Bundle, Gauge>,
    pub bundle_activation_failures: Counter,
    pub authority_expiry_seconds: Family<Authority, Gauge<f64, AtomicU64>>,
    pub webhook_deliveries: Family<Outcome, Counter>,
    pub overload_refusals: Counter,
    pub evidence_cache: Family<Outcome, Counter>,
}

/// From 0.5 ms to about 16 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("castellan");
        let m = Self {
            issued: Family::default(),
            refused: Family::default(),
            stage_seconds: Family::new_with_constructor(latency),
            http_seconds: Family::new_with_constructor(latency),
            store_commit_seconds: latency(),
            pending_approvals: Gauge::default(),
            workload_streams: Gauge::default(),
            workload_pushes: Counter::default(),
            bundle_revision: Family::default(),
            bundle_activation_failures: Counter::default(),
            authority_expiry_seconds: Family::default(),
            webhook_deliveries: Family::default(),
            overload_refusals: Counter::default(),
            evidence_cache: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "credentials_issued",
            "Credentials issued, by flow and attestation method",
            m.issued.clone(),
        );
        registry.register(
            "credentials_refused",
            "Requests refused, by flow, method and problem type",
            m.refused.clone(),
        );
        registry.register(
            "stage_duration_seconds",
            "Time spent in each pipeline stage (attest, decide, approve_wait, sign, record)",
            m.stage_seconds.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP requests end to end, by route and status class",
            m.http_seconds.clone(),
        );
        registry.register(
            "store_commit_duration_seconds",
            "Store write transactions, from submission to durable commit",
            m.store_commit_seconds.clone(),
        );
        registry.register(
            "pending_approvals",
            "Just-in-time requests waiting for approvers",
            m.pending_approvals.clone(),
        );
        registry.register(
            "workload_api_streams",
            "Open Workload API and SDS streams",
            m.workload_streams.clone(),
        );
        registry.register(
            "workload_api_pushes",
            "Responses pushed on Workload API and SDS streams",
            m.workload_pushes.clone(),
        );
        registry.register(
            "bundle_revision",
            "The active policy bundle's revision (1 for the active one)",
            m.bundle_revision.clone(),
        );
        registry.register(
            "bundle_activation_failures",
            "Policy bundles refused at activation",
            m.bundle_activation_failures.clone(),
        );
        registry.register(
            "ca_authority_expiry_seconds",
            "Seconds until each published signing authority expires",
            m.authority_expiry_seconds.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries, by outcome",
            m.webhook_deliveries.clone(),
        );
        registry.register(
            "overload_refusals",
            "Requests refused because every admission permit and queue slot was taken",
            m.overload_refusals.clone(),
        );
        registry.register(
            "evidence_cache_lookups",
            "Lookups of verified service-account tokens, by outcome (hit, miss)",
            m.evidence_cache.clone(),
        );
        // Both outcomes from the start, so that rules over them see zeros.
        for outcome in ["delivered", "failed"] {
            m.webhook_deliveries
                .get_or_create(&Outcome {
                    outcome: outcome.into(),
                })
                .inc_by(0);
        }
        Self { registry, ..m }
    }

    /// A lookup of verified evidence.
    pub fn evidence_cache(&self, hit: bool) {
        self.evidence_cache
            .get_or_create(&Outcome {
                outcome: if hit { "hit" } else { "miss" }.into(),
            })
            .inc();
    }

    /// Times a stage.
    pub fn stage(&self, stage: &str, seconds: f64) {
        self.stage_seconds
            .get_or_create(&Stage {
                stage: stage.to_owned(),
            })
            .observe(seconds);
    }

    /// One credential issued.
    pub fn issued(&self, flow: &str, method: &str) {
        self.issued
            .get_or_create(&Flow {
                flow: flow.to_owned(),
                method: method.to_owned(),
            })
            .inc();
    }

    /// The registry in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Counts an open stream for as long as it lives.
pub struct OpenStream(());

impl OpenStream {
    pub fn open() -> Self {
        get().workload_streams.inc();
        Self(())
    }

    /// A response was pushed on it.
    pub fn pushed(&self) {
        get().workload_pushes.inc();
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        get().workload_streams.dec();
    }
}

/// Times the rest of a scope as `stage`.
pub struct StageTimer {
    stage: &'static str,
    start: std::time::Instant,
}

impl StageTimer {
    pub fn start(stage: &'static str) -> Self {
        Self {
            stage,
            start: std::time::Instant::now(),
        }
    }
}

impl Drop for StageTimer {
    fn drop(&mut self) {
        get().stage(self.stage, self.start.elapsed().as_secs_f64());
    }
}
