//! Webhook notifications. Events are queued in the store's outbox in the
//! same transaction as the change they describe, so none is lost to a crash;
//! this dispatcher delivers them, signed with HMAC-SHA256, and retries with
//! exponential backoff until each configured webhook has taken the event or
//! the attempts run out (then it is audited as undeliverable).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use serde::Deserialize;
use serde_json::json;

use crate::client::Endpoint;
use crate::store::{AuditEvent, OutboxItem, Store};
use crate::util::now_unix;

/// Attempts per webhook before an event is given up on.
const MAX_ATTEMPTS: u32 = 10;
/// Longest wait between attempts.
const MAX_BACKOFF_SECONDS: i64 = 300;
/// How often the outbox is read.
const POLL: Duration = Duration::from_millis(200);

/// Why a webhook is refused at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookConfigError {
    /// The URL is not usable.
    #[error("webhook `{name}` url")]
    Url {
        name: String,
        #[source]
        source: crate::client::ClientError,
    },
    /// Its roots could not be loaded.
    #[error("webhook `{name}` ca_file")]
    Tls {
        name: String,
        #[source]
        source: crate::tls::TlsError,
    },
    /// Plain HTTP to anything but loopback.
    #[error("webhook `{0}`: plain http:// is only allowed to a loopback address")]
    PlainHttp(String),
    /// The secret file could not be read.
    #[error("webhook `{name}` secret_file {path}")]
    Secret {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The secret is too short to sign with.
    #[error("webhook `{0}`: the secret must be at least 16 characters")]
    ShortSecret(String),
}

/// Why one delivery failed (it is retried).
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("timed out")]
    Timeout,
    #[error("receiver answered {0}")]
    Status(hyper::StatusCode),
}

/// A webhook as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// A name for logs and the audit trail.
    pub name: String,
    /// `http://` (loopback only) or `https://` URL that receives POSTs.
    pub url: String,
    /// File holding the shared HMAC secret.
    pub secret_file: PathBuf,
    /// Events to send; empty means all (`ephemeral.created`,
    /// `ephemeral.decided`, `ephemeral.issued`, `ephemeral.expired`,
    /// `ephemeral.break_glass`).
    #[serde(default)]
    pub events: Vec<String>,
    /// CA certificate (PEM) to trust for an `https://` URL.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// A webhook ready to deliver to.
struct Webhook {
    name: String,
    endpoint: Endpoint,
    path: String,
    key: ring::hmac::Key,
    events: Vec<String>,
}

impl Webhook {
    fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event)
    }
}

/// Delivers outbox items to the configured webhooks.
pub struct Dispatcher {
    store: Store,
    hooks: Vec<Webhook>,
}

/// `t=<unix>,v1=<hex>` where v1 is HMAC-SHA256 over `<t>.<body>`.
pub fn signature(key: &ring::hmac::Key, timestamp: i64, body: &[u8]) -> String {
    let mut msg = format!("{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(ring::hmac::sign(key, &msg).as_ref())
    )
}

impl Dispatcher {
    /// Validates the webhook settings and reads their secrets.
    pub fn new(store: Store, configs: &[WebhookConfig]) -> Result<Self, WebhookConfigError> {
        let mut hooks = Vec::new();
        for c in configs {
            // https:// trusts the public web roots, plus `ca_file` if given.
            let tls = if c.url.starts_with("https://") {
                Some(
                    crate::tls::web_client_config(c.ca_file.as_deref()).map_err(|source| {
                        WebhookConfigError::Tls {
                            name: c.name.clone(),
                            source,
                        }
                    })?,
                )
            } else {
                None
            };
            let (endpoint, path) =
                Endpoint::parse_url_with(&c.url, tls).map_err(|source| WebhookConfigError::Url {
                    name: c.name.clone(),
                    source,
                })?;
            if c.url.starts_with("http://") {
                let host = c
                    .url
                    .trim_start_matches("http://")
                    .split(['/', ':'])
                    .next()
                    .unwrap_or_default();
                if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
                    return Err(WebhookConfigError::PlainHttp(c.name.clone()));
                }
            }
            let secret =
                std::fs::read_to_string(&c.secret_file).map_err(|source| WebhookConfigError::Secret {
                    name: c.name.clone(),
                    path: c.secret_file.display().to_string(),
                    source,
                })?;
            let secret = secret.trim();
            if secret.len() < 16 {
                return Err(WebhookConfigError::ShortSecret(c.name.clone()));
            }
            hooks.push(Webhook {
                name: c.name.clone(),
                endpoint,
                path,
                key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes()),
                events: c.events.clone(),
            });
        }
        Ok(Self { store, hooks })
    }

    /// Runs forever, delivering what the outbox holds.
    pub async fn run(self) {
        loop {
            // Gateways sharing a store deliver once: only the leader does.
            if self.store.is_leader()
                && let Err(e) = self.pass().await
            {
                tracing::warn!(error = %e, "webhook dispatch pass failed");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn pass(&self) -> Result<(), crate::store::StoreError> {
        let now = now_unix();
        // Delivered items leave in one transaction per pass, not one each
        // (with no webhooks configured, every event is delivered at once).
        let mut delivered = Vec::new();
        for mut item in self.store.outbox(100).await? {
            if item.next_attempt_at > now {
                continue;
            }
            let mut failed = false;
            for hook in &self.hooks {
                if item.done.contains(&hook.name) {
                    continue;
                }
                if !hook.wants(&item.notification.event) {
                    item.done.push(hook.name.clone());
                    continue;
                }
                let delivered = self.deliver(hook, &item).await;
                let outcome = if delivered.is_ok() { "delivered" } else { "failed" };
                crate::metrics::get()
                    .webhook_deliveries
                    .get_or_create(&crate::metrics::Outcome {
                        outcome: outcome.into(),
                    })
                    .inc();
                match delivered {
                    Ok(()) => item.done.push(hook.name.clone()),
                    Err(e) => {
                        let attempts = item.attempts.entry(hook.name.clone()).or_insert(0);
                        *attempts += 1;
                        tracing::warn!(webhook = %hook.name, attempt = *attempts, error = %e, "webhook delivery failed");
                        if *attempts >= MAX_ATTEMPTS {
                            item.done.push(hook.name.clone());
                            let event = AuditEvent {
                                kind: crate::model::AuditKind::WebhookUndeliverable,
                                actor: crate::model::Actor::Castellan,
                                detail: json!({ "webhook": hook.name, "delivery": item.id, "event": item.notification.event, "error": crate::util::error_chain(&e) }),
                            };
                            self.store.audit(event).await?;
                        } else {
                            failed = true;
                        }
                    }
                }
            }
            let all_done = self.hooks.iter().all(|h| item.done.contains(&h.name));
            if all_done {
                delivered.push(item.seq);
            } else if failed {
                let worst = item.attempts.values().copied().max().unwrap_or(1);
                item.next_attempt_at = now + (1i64 << (worst - 1).min(9)).min(MAX_BACKOFF_SECONDS);
                self.store.outbox_update(item.seq, Some(item)).await?;
            }
        }
        if !delivered.is_empty() {
            self.store.outbox_remove(delivered).await?;
        }
        Ok(())
    }

    async fn deliver(&self, hook: &Webhook, item: &OutboxItem) -> Result<(), DeliveryError> {
        let body = json!({
            "id": item.id,
            "event": item.notification.event,
            "created_at": item.created_at,
            "data": item.notification.payload,
        })
        .to_string()
        .into_bytes();
        let timestamp = now_unix();
        let headers = [
            ("x-castellan-event", item.notification.event.clone()),
            ("x-castellan-delivery", item.id.clone()),
            ("x-castellan-signature", signature(&hook.key, timestamp, &body)),
        ];
        let send = async {
            let mut conn = hook.endpoint.connect().await?;
            conn.send_with(Method::POST, &hook.path, None, &headers, Some(Bytes::from(body)))
                .await
        };
        let (status, _) = tokio::time::timeout(Duration::from_secs(10), send)
            .await
            .map_err(|_| DeliveryError::Timeout)??;
        if !status.is_success() {
            return Err(DeliveryError::Status(status));
        }
        Ok(())
    }
}
