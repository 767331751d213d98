//! `unix`: attests a local process by what the kernel says about it.
//!
//! The evidence is built by the host from the socket's peer credentials
//! (`SO_PEERCRED`) and `/proc`, never by the caller: `{"pid", "uid", "gid",
//! "user"?, "group"?, "path"?, "sha256"?}`. The module turns it into the
//! selectors registration entries match on: `unix:uid:`, `unix:gid:`,
//! `unix:user:`, `unix:group:`, `unix:path:`, `unix:sha256:`. A Kubernetes
//! workload attestor can be another module over the same kind of evidence.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::String;

use castellan_attestor_sdk::serde_json::Value;
use castellan_attestor_sdk::{Attestation, Attestor, Context, Error, attestor};
use serde::Deserialize;

/// Longest user, group, path or hash taken from the evidence. Each becomes
/// a selector, which the host caps at 1024 bytes; an executable path can
/// be up to 4096 bytes (`PATH_MAX`), and such a process must be refused,
/// not turned into an answer the host rejects as a module fault.
const MAX_VALUE_BYTES: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Evidence {
    pid: u32,
    uid: u32,
    gid: u32,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

pub struct Unix;

impl Attestor for Unix {
    type Config = Value;

    fn attest(evidence: &str, _config: Value, _context: &Context) -> Result<Attestation, Error> {
        let e: Evidence = castellan_attestor_sdk::json_evidence(evidence)?;
        for (name, value) in [
            ("user", &e.user),
            ("group", &e.group),
            ("path", &e.path),
            ("sha256", &e.sha256),
        ] {
            if value.as_ref().is_some_and(|v| v.len() > MAX_VALUE_BYTES) {
                return Err(Error::rejected(format!(
                    "the caller's {name} is longer than {MAX_VALUE_BYTES} bytes"
                )));
            }
        }
        let uid = format!("{}", e.uid);
        let gid = format!("{}", e.gid);
        let mut a = Attestation::new(format!("uid/{}", e.uid))
            .selector("unix", "uid", &uid)
            .selector("unix", "gid", &gid)
            .claim("pid", e.pid)
            .claim("uid", e.uid)
            .claim("gid", e.gid);
        if let Some(u) = &e.user {
            a = a.selector("unix", "user", u).claim("user", u.as_str());
        }
        if let Some(g) = &e.group {
            a = a.selector("unix", "group", g).claim("group", g.as_str());
        }
        if let Some(p) = &e.path {
            a = a.selector("unix", "path", p).claim("path", p.as_str());
        }
        if let Some(h) = &e.sha256 {
            a = a.selector("unix", "sha256", h);
        }
        Ok(a)
    }
}

attestor!(Unix);
