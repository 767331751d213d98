//! The host capabilities a module may import. Each is narrow: verify a JWS
//! with a named key set, read the clock, log. Nothing here reads files,
//! opens sockets or exposes the environment.

use super::HostState;
use super::bindings::castellan::attestor::{clock, crypto, log, types};

impl types::Host for HostState {}

impl crypto::Host for HostState {
    fn verify_jws(&mut self, key_set: String, compact: String) -> Result<crypto::VerifiedJws, String> {
        let keys = self.trust.key_sets.get(&key_set).ok_or_else(|| {
            format!(
                "unknown key set `{}`",
                key_set.chars().take(64).collect::<String>()
            )
        })?;
        let (header, payload) = keys.verify_compact(&compact)?;
        Ok(crypto::VerifiedJws {
            header_json: header.to_string(),
            payload_json: payload,
        })
    }
}

impl clock::Host for HostState {
    fn now(&mut self) -> i64 {
        crate::util::now_unix()
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let message: String = message.chars().take(1024).collect();
        match level {
            log::Level::Debug => tracing::debug!(method = %self.method, "{message}"),
            log::Level::Info => tracing::info!(method = %self.method, "{message}"),
            log::Level::Warn => tracing::warn!(method = %self.method, "{message}"),
        }
    }
}
