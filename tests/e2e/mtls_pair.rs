//! `examples/mtls-pair` against the real binary: two workloads get their
//! X.509-SVIDs from `castellan dev`'s Workload API, attested by the path of
//! their executable, and talk mTLS accepting only each other's exact SPIFFE
//! ID. The example's binaries are built by cargo and copied to one path per
//! role, so each `unix:path:` selector names exactly one workload.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Server;

const SERVER: &str = "spiffe://example.org/server";
const CLIENT: &str = "spiffe://example.org/client";
const INTRUDER: &str = "spiffe://example.org/intruder";
const IMPOSTOR: &str = "spiffe://example.org/impostor";

/// The example's executables, one copy per role.
struct Roles {
    server: PathBuf,
    client: PathBuf,
    /// A copy of the client no entry names.
    stranger: PathBuf,
    /// A copy of the client registered under another SPIFFE ID.
    intruder: PathBuf,
    /// A copy of the server registered under another SPIFFE ID.
    impostor: PathBuf,
}

/// Built and copied once per test process, before any test starts a
/// process: a copy still open for writing when another thread forks would
/// fail to exec with "text file busy".
fn roles() -> &'static Roles {
    static ROLES: OnceLock<Roles> = OnceLock::new();
    ROLES.get_or_init(|| {
        let built = build_example();
        let stage = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-mtls-pair");
        let _ = std::fs::remove_dir_all(&stage);
        let copy = |role: &str, bin: &str| {
            let dir = stage.join(role);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(&built[bin], dir.join(bin)).unwrap();
            // The kernel reports the resolved path; so must the selector.
            dir.join(bin).canonicalize().unwrap()
        };
        Roles {
            server: copy("server", "mtls-server"),
            client: copy("client", "mtls-client"),
            stranger: copy("stranger", "mtls-client"),
            intruder: copy("intruder", "mtls-client"),
            impostor: copy("impostor", "mtls-server"),
        }
    })
}

/// Builds the example's binaries into the target directory and profile
/// this test was built for; cargo says where each executable is.
///
/// It asks for the whole workspace with all targets, as `cargo test
/// --workspace --all-targets` built it, so that features resolve the same
/// way: after that build this one is fresh. Building the example package
/// alone resolves features without the workspace's dev-dependencies and
/// recompiled about half its dependency graph (some 80 crates, 3 minutes
/// of CI); so did the package variables a test inherits (below).
fn build_example() -> HashMap<String, PathBuf> {
    let castellan = Path::new(env!("CARGO_BIN_EXE_castellan"));
    let profile_dir = castellan.parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    // Cargo gives a test the variables of the package it belongs to; a
    // build script that reruns when one changes (ring's watches
    // CARGO_MANIFEST_DIR, CARGO_PKG_* and OUT_DIR) would be rebuilt with
    // them, so they go.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let package_scoped = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CFG_"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
            || [
                "OUT_DIR",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref());
        if package_scoped {
            cargo.env_remove(name.as_ref());
        }
    }
    cargo
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["build", "--workspace", "--all-targets"])
        .args(["--message-format", "json-render-diagnostics", "--target-dir"])
        .arg(profile_dir.parent().unwrap());
    match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => {}
        "release" => {
            cargo.arg("--release");
        }
        other => {
            cargo.args(["--profile", other]);
        }
    }
    let out = cargo.stderr(Stdio::inherit()).output().expect("run cargo");
    assert!(out.status.success(), "cargo build of examples/mtls-pair failed");
    let mut bins = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("castellan-example-mtls-pair"))
            && msg["profile"]["test"] == false
            && let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            bins.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    assert!(
        bins.contains_key("mtls-server") && bins.contains_key("mtls-client"),
        "cargo named no example binaries: {bins:?}"
    );
    bins
}

/// Registers `exe`, by its exact path, as `spiffe_id`.
fn register(server: &Server, spiffe_id: &str, exe: &Path) {
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({
            "spiffe_id": spiffe_id,
            "selectors": [format!("unix:path:{}", exe.display()), format!("unix:uid:{}", support::my_uid())],
            "x509_svid_ttl": 3600,
        }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// An example binary pointed at `castellan`'s Workload API, output captured.
fn workload(castellan: &Server, exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c.env(
        "SPIFFE_ENDPOINT_SOCKET",
        format!("unix:{}", castellan.dir.join("workload.sock").display()),
    )
    .env("RUST_LOG", "info")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// A running `mtls-server`, killed on drop; its log is collected as it comes.
struct MtlsServer {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl MtlsServer {
    fn start(castellan: &Server, exe: &Path, allow: &str) -> Self {
        let mut child = workload(castellan, exe)
            .args(["--listen", "127.0.0.1:0", "--allow", allow])
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let (tx, rx) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            panic!(
                "{} did not report `listening on`: {}",
                exe.display(),
                log.lock().unwrap()
            )
        });
        Self { child, addr, log }
    }

    /// Waits until the server has logged `needle`; returns the whole log.
    fn logged(&self, needle: &str) -> String {
        let seen = support::eventually(Duration::from_secs(10), || {
            self.log.lock().unwrap().contains(needle)
        });
        let log = self.log.lock().unwrap().clone();
        assert!(seen, "the server never logged {needle:?}; its log:\n{log}");
        log
    }
}

impl Drop for MtlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished `mtls-client` printed.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the client failed without printing an answer; returns stderr.
    fn refused(&self, who: &str) -> &str {
        assert!(
            !self.ok && self.stdout.is_empty(),
            "{who} was answered: {}",
            self.stdout
        );
        &self.stderr
    }
}

/// Runs `mtls-client` to the end, waiting at most 3 s for its SVID; the
/// whole run must take less than 30 s.
fn client(castellan: &Server, exe: &Path, addr: &str, expect: &str) -> Run {
    let limit = Duration::from_secs(30);
    let mut child = workload(castellan, exe)
        .args(["--connect", addr, "--expect", expect, "--timeout-secs", "3"])
        .spawn()
        .unwrap();
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{} still running after {limit:?}", exe.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        ok: status.success(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Reads a pipe to its end on a thread of its own, so a full pipe never
/// blocks the child.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// `castellan dev` with the server and client registered by their exact
/// paths, and the server running with `--allow` the client.
fn registered_pair() -> (&'static Roles, Server, MtlsServer) {
    let roles = roles();
    let castellan = Server::dev();
    register(&castellan, SERVER, &roles.server);
    register(&castellan, CLIENT, &roles.client);
    let server = MtlsServer::start(&castellan, &roles.server, CLIENT);
    (roles, castellan, server)
}

#[test]
fn the_registered_pair_talks_and_each_side_names_the_other() {
    let (roles, castellan, server) = registered_pair();
    let hello = format!("hello {CLIENT}, I am {SERVER}\n");
    let run = client(&castellan, &roles.client, &server.addr, SERVER);
    assert!(run.ok, "the client failed: {}", run.stderr);
    assert_eq!(run.stdout, hello);
    server.logged(&format!("answered client={CLIENT}"));
    // Each connection presents the SVID current then; a second one works too.
    let again = client(&castellan, &roles.client, &server.addr, SERVER);
    assert!(
        again.ok && again.stdout == hello,
        "{}{}",
        again.stdout,
        again.stderr
    );
}

#[test]
fn an_unregistered_copy_of_the_client_gets_no_svid_and_fails_in_bounded_time() {
    let (roles, castellan, server) = registered_pair();
    // The same executable as the registered client, at another path.
    let run = client(&castellan, &roles.stranger, &server.addr, SERVER);
    let stderr = run.refused("the unregistered client");
    assert!(
        stderr.contains("error: no X.509-SVID from the Workload API at unix:")
            && stderr.contains("within 3 s: permission denied: no identity is registered for this caller"),
        "{stderr}"
    );
    // It never got as far as the server.
    assert!(!server.log.lock().unwrap().contains("connection from"));
}

#[test]
fn a_client_registered_under_another_id_is_refused_by_the_server() {
    let (roles, castellan, server) = registered_pair();
    register(&castellan, INTRUDER, &roles.intruder);
    let run = client(&castellan, &roles.intruder, &server.addr, SERVER);
    // It had an SVID and accepted the server; the server said no.
    let stderr = run.refused("the intruder");
    let refusal = format!(
        "error: the server at {} refused this workload ({INTRUDER}): TLS alert access_denied",
        server.addr
    );
    assert!(stderr.contains(&refusal), "{stderr}");
    let log = server.logged(&format!(
        "refused the client: {INTRUDER} is not {CLIENT}, the only SPIFFE ID accepted"
    ));
    assert!(!log.contains("answered"), "{log}");
}

#[test]
fn a_server_the_client_does_not_expect_is_refused_by_the_client() {
    let (roles, castellan, _server) = registered_pair();
    register(&castellan, IMPOSTOR, &roles.impostor);
    // The impostor would serve the client; the client will not have it.
    let impostor = MtlsServer::start(&castellan, &roles.impostor, CLIENT);
    let run = client(&castellan, &roles.client, &impostor.addr, SERVER);
    let stderr = run.refused("the client of the impostor");
    assert!(
        stderr.contains(&format!("refused the server: {IMPOSTOR} is not {SERVER}"))
            && stderr.contains(&format!(
                "error: refused the server at {}: it is not {SERVER}",
                impostor.addr
            )),
        "{stderr}"
    );
    let log = impostor.logged("TLS handshake failed: received fatal alert: AccessDenied");
    assert!(!log.contains("answered"), "{log}");
}
