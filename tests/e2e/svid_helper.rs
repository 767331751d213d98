//! `castellan svid-helper` against a real `castellan dev`: the files it
//! writes, their modes, the chain and key they hold, rotation with a signalled
//! (or restarted) command, and the failure when no identity is registered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::{Server, eventually, pem_certs};
use x509_parser::extensions::GeneralName;

/// Our own uid, as the kernel will report it to the server.
fn my_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

fn register(server: &Server, spiffe_id: &str, x509_ttl: u64) {
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": spiffe_id, "selectors": [format!("unix:uid:{}", my_uid())], "x509_svid_ttl": x509_ttl}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

fn socket(server: &Server) -> PathBuf {
    server.dir.join("workload.sock")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The leaf's serial, or None while the file is not there yet.
fn leaf_serial(dir: &Path) -> Option<Vec<u8>> {
    let pem = std::fs::read_to_string(dir.join("svid.pem")).ok()?;
    let der = pem_certs(&pem).into_iter().next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.raw_serial().to_vec())
}

/// The key file holds the private half of the leaf's public key.
fn key_matches_leaf(dir: &Path) -> bool {
    let key_pem = read(&dir.join("svid_key.pem"));
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let der = pem_certs(&read(&dir.join("svid.pem"))).remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    leaf.public_key().raw == &rcgen::PublicKeyData::subject_public_key_info(&key)[..]
}

fn pid_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; its state says it is gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A running helper, stopped with SIGTERM (or killed) on drop together with
/// the command it started, whose pid the test's script records.
struct Helper {
    child: Child,
    pid_file: Option<PathBuf>,
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Helper {
    fn spawn(args: &[String], pid_file: Option<PathBuf>) -> Self {
        let mut child = support::castellan()
            .arg("svid-helper")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            pid_file,
            stdout,
        }
    }

    fn wrote_lines(&self) -> usize {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("wrote svid.pem, svid_key.pem, bundle.pem for "))
            .count()
    }

    /// SIGTERM: the helper stops its command and exits 0.
    fn terminate(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "helper did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "helper exit status {status}");
        if let Some(cmd) = self.pid_file.as_deref().and_then(read_pid) {
            assert!(
                eventually(Duration::from_secs(5), || !pid_alive(cmd)),
                "the command {cmd} outlived the helper"
            );
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = self.pid_file.as_deref().and_then(read_pid) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[test]
fn once_writes_a_verifiable_svid_key_bundle_and_jwt() {
    let server = Server::dev();
    let id = "spiffe://example.org/helper/once";
    register(&server, id, 3600);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let out = support::castellan()
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix:{}", socket(&server).display()),
        )
        .args(["svid-helper", "--once", "--dir"])
        .arg(&dir)
        .args(["--jwt-audience", "payments", "--jwt-audience", "audit"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains(&format!(
            "wrote svid.pem, svid_key.pem, bundle.pem for {id} (expires 20"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "wrote jwt_svid.token, jwt_bundle.json for {id} (audience payments, audit; expires 20"
        )),
        "{stdout}"
    );

    // The directory was made private; the key and token are 0600; no temp files are left.
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("svid_key.pem")), 0o600);
    assert_eq!(mode(&dir.join("jwt_svid.token")), 0o600);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bundle.pem",
            "jwt_bundle.json",
            "jwt_svid.token",
            "svid.pem",
            "svid_key.pem"
        ]
    );

    // svid.pem: the leaf with the entry's SPIFFE ID as its one URI SAN, then
    // intermediates (none with the default one-tier CA).
    let chain = pem_certs(&read(&dir.join("svid.pem")));
    assert!(!chain.is_empty(), "the leaf");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [id]);

    // It chains to bundle.pem under a real path validator.
    let bundle = pem_certs(&read(&dir.join("bundle.pem")));
    assert!(!bundle.is_empty());
    let anchors: Vec<_> = bundle
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(&rustls_pki_types::CertificateDer::from(d.as_slice()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let leaf_der = rustls_pki_types::CertificateDer::from(chain[0].as_slice());
    let intermediates: Vec<_> = chain[1..]
        .iter()
        .map(|d| rustls_pki_types::CertificateDer::from(d.as_slice()))
        .collect();
    webpki::EndEntityCert::try_from(&leaf_der)
        .unwrap()
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .expect("svid.pem validates to bundle.pem");

    // svid_key.pem: PKCS#8, the private half of the leaf's key.
    let key_pem = read(&dir.join("svid_key.pem"));
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "PKCS#8 PEM");
    assert!(key_matches_leaf(&dir));
    assert!(!stdout.contains("PRIVATE KEY") && !stderr.contains("PRIVATE KEY"));

    // jwt_svid.token: a JWT-SVID for the audiences, signed by a key in jwt_bundle.json.
    let token = read(&dir.join("jwt_svid.token"));
    assert!(
        !stdout.contains(&token) && !stderr.contains(&token),
        "the token is never printed"
    );
    let payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert_eq!(payload["sub"], id);
    let aud: Vec<_> = payload["aud"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(aud.contains(&"payments") && aud.contains(&"audit"), "{payload}");
    let jwks: Value = serde_json::from_str(&read(&dir.join("jwt_bundle.json"))).unwrap();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the token's kid is in jwt_bundle.json");
    let key = jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk.clone()).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::decode_header(&token).unwrap().alg);
    validation.set_audience(&["payments"]);
    jsonwebtoken::decode::<Value>(&token, &key, &validation)
        .expect("the JWT verifies against jwt_bundle.json");
}

#[test]
fn the_daemon_rewrites_on_rotation_and_signals_or_restarts_the_command() {
    let server = Server::dev();
    let id = "spiffe://example.org/helper/rotating";
    register(&server, id, 10);
    let tmp = tempfile::tempdir().unwrap();
    // Records each start and each SIGHUP in $1, its pid in $2. `wait` is
    // interrupted by a trapped signal, so a SIGHUP is recorded at once.
    let recorder = tmp.path().join("recorder.sh");
    std::fs::write(
        &recorder,
        "#!/bin/sh\necho start >> \"$1\"\necho $$ > \"$2\"\ntrap 'echo hup >> \"$1\"' HUP\nwhile true; do sleep 0.2 & wait $!; done\n",
    )
    .unwrap();
    // Records its start and exits at once.
    let quitter = tmp.path().join("quitter.sh");
    std::fs::write(&quitter, "#!/bin/sh\necho start >> \"$1\"\n").unwrap();
    for script in [&recorder, &quitter] {
        std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sock = socket(&server).display().to_string();
    let s = |p: &Path| p.display().to_string();
    // A helper in its own directory, its command's log and pid file beside it.
    let spawn = |name: &str, script: &Path, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let (log, pid) = (dir.with_extension("log"), dir.with_extension("pid"));
        let mut args = vec![
            "--socket".to_owned(),
            sock.clone(),
            "--dir".into(),
            s(&dir),
            "--cmd".into(),
            s(script),
            "--cmd-args".into(),
            format!("{} {}", s(&log), s(&pid)),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        (Helper::spawn(&args, Some(pid.clone())), dir, log, pid)
    };

    // Three helpers at once, sharing the rotations: signalled, restarted, and
    // one whose command exits by itself.
    let (signalled, sig_dir, sig_log, sig_pid) = spawn(
        "signalled",
        &recorder,
        &["--signal", "SIGHUP", "--jwt-audience", "payments"],
    );
    let (restarted, _, re_log, re_pid) = spawn("restarted", &recorder, &[]);
    let (quitting, _, q_log, _) = spawn("quitting", &quitter, &["--signal", "HUP"]);

    assert!(
        eventually(Duration::from_secs(30), || read_pid(&sig_pid).is_some()
            && read_pid(&re_pid).is_some()),
        "the commands start after the first write"
    );
    let first_serial = leaf_serial(&sig_dir).expect("svid.pem written before the command started");
    let first_sig_pid = read_pid(&sig_pid).unwrap();
    let first_re_pid = read_pid(&re_pid).unwrap();
    assert!(eventually(Duration::from_secs(30), || q_log.exists()));
    assert_eq!(
        read(&q_log).lines().count(),
        1,
        "an exited command waits for the next rotation"
    );

    assert!(
        sig_dir.join("jwt_svid.token").exists(),
        "started after the JWT-SVID was written too"
    );

    // A 10 s SVID is pushed again at half-life: a new serial in the files,
    // then SIGHUP, and no SIGHUP before it (the log is read first, so a
    // SIGHUP seen with the old serial still in place came too early).
    let mut rotated = false;
    assert!(
        eventually(Duration::from_secs(20), || {
            let hup = read(&sig_log).contains("hup");
            rotated = rotated || leaf_serial(&sig_dir).is_some_and(|s| s != first_serial);
            assert!(!hup || rotated, "SIGHUP before any rotation");
            hup
        }),
        "svid.pem rewritten with a fresh SVID, then SIGHUP: {}",
        read(&sig_log)
    );
    assert_eq!(read_pid(&sig_pid), Some(first_sig_pid));
    assert!(pid_alive(first_sig_pid));
    assert_eq!(
        read(&sig_log).matches("start").count(),
        1,
        "signalled, not restarted"
    );
    // The other was restarted: a new process, started twice, the old one gone.
    assert!(
        eventually(Duration::from_secs(20), || read_pid(&re_pid)
            .is_some_and(|p| p != first_re_pid)),
        "restarted on rotation"
    );
    assert!(eventually(Duration::from_secs(5), || !pid_alive(first_re_pid)));
    assert!(!read(&re_log).contains("hup"));
    // The one that had exited was started again at the rotation.
    assert!(
        eventually(Duration::from_secs(20), || read(&q_log).lines().count() >= 2),
        "an exited command starts again at the next rotation"
    );

    // The rewritten files still belong together (the signal follows every write).
    assert!(eventually(Duration::from_secs(5), || key_matches_leaf(&sig_dir)));
    assert_eq!(mode(&sig_dir.join("svid_key.pem")), 0o600);
    assert!(signalled.wrote_lines() >= 2, "a `wrote` line per update");

    signalled.terminate();
    restarted.terminate();
    quitting.terminate();
}

#[test]
fn once_without_an_identity_fails_after_the_timeout() {
    let server = Server::dev();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let start = Instant::now();
    let out = support::castellan()
        .args(["svid-helper", "--once", "--timeout-secs", "3", "--socket"])
        .arg(socket(&server))
        .arg("--dir")
        .arg(&dir)
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        (Duration::from_millis(2500)..Duration::from_secs(20)).contains(&took),
        "gave up after {took:?}"
    );
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("error: no identity is registered for this process"),
        "{stderr}"
    );
    assert!(
        last.contains("PermissionDenied") && last.contains("--timeout-secs"),
        "{stderr}"
    );
    assert!(last.contains(&format!("unix:uid:{}", my_uid())), "{stderr}");
    assert!(!dir.join("svid.pem").exists());
}
