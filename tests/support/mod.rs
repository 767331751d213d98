//! Test support: start the real `castellan` binary, talk to it over real
//! HTTP, and make fixtures (keys, JWKS, tokens, CSRs) from scratch.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::KeyPair;
use serde_json::{Value, json};

/// The store tests' throwaway PostgreSQL cluster (shared with the unit tests).
#[path = "../../gateway/src/store/pg_test_cluster.rs"]
mod pg;

/// A fresh, empty database on a throwaway PostgreSQL cluster, as a URL.
pub fn postgres_url() -> String {
    pg::database_url()
}

/// The CA the throwaway cluster's TLS certificate (for `localhost`) chains to.
pub fn postgres_tls_ca() -> PathBuf {
    pg::tls_ca()
}

/// `castellan serve --config FILE` that must refuse to start: its stderr.
pub fn serve_refused(config: &Path) -> String {
    let out = castellan()
        .args(["serve", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(!out.status.success(), "serve started with {}", config.display());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// SoftHSM2's PKCS#11 module (installed by scripts/setup.sh).
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A SoftHSM2 token of its own under `root`, labelled `castellan`, user PIN
/// in `root/pin`: returns the `SOFTHSM2_CONF` to run the binary with.
pub fn softhsm_token(root: &Path) -> PathBuf {
    let tokens = root.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = root.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .unwrap();
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "castellan",
            "--pin",
            "1234",
            "--so-pin",
            "5678",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util (scripts/setup.sh installs softhsm2)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(root.join("pin"), "1234\n").unwrap();
    conf
}

/// The binary under test.
pub fn castellan() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_castellan"));
    c.env("CASTELLAN_LOG", "warn");
    c
}

/// A running `castellan signer`, killed on drop.
pub struct SignerProcess {
    child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Drop for SignerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `castellan signer` with its data in `ROOT/signer`, allowing `allowed_uid`.
pub fn start_signer(root: &Path, allowed_uid: u32) -> SignerProcess {
    let config = root.join("signer.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"signer\"\nallowed_uids = [{allowed_uid}]\n\
             max_x509_ttl_seconds = 86400\nmax_jwt_ttl_seconds = 3600\n"
        ),
    )
    .unwrap();
    let mut child = castellan()
        .args(["signer", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(path) = line.strip_prefix("signer listening on unix:") {
                let _ = tx.send(PathBuf::from(path.trim()));
            }
        }
    });
    let socket = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the signer started");
    SignerProcess {
        child,
        socket,
        dir: root.join("signer"),
    }
}

/// A running `castellan dev` (or `serve`) process, killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    pub dir: PathBuf,
    pub admin_token: String,
    agent: ureq::Agent,
    _tmp: Option<tempfile::TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads stdout until `listening on <url>`; returns the URL.
fn wait_for_listening(child: &mut Child) -> String {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && let Some(url) = line.strip_prefix("listening on ") {
                let _ = tx.send(url.trim().to_owned());
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("server did not report `listening on` within 60 s")
}

impl Server {
    /// `castellan dev` in a fresh temporary data directory.
    pub fn dev() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let mut s = Self::dev_in(&dir, &[]);
        s._tmp = Some(tmp);
        s
    }

    /// `castellan dev` on a given data directory, with extra arguments.
    pub fn dev_in(dir: &Path, extra: &[&str]) -> Self {
        let mut child = castellan()
            .args(["dev", "--data-dir"])
            .arg(dir)
            .args(["--http-addr", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn castellan dev");
        let base = wait_for_listening(&mut child);
        let admin_token = std::fs::read_to_string(dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            child,
            base,
            dir: dir.to_owned(),
            admin_token,
            agent: agent(),
            _tmp: None,
        }
    }

    /// `castellan serve --config FILE`; the URL is what the server printed.
    pub fn serve(config: &Path, dir: &Path) -> Self {
        Self::serve_with_env(config, dir, &[])
    }

    /// `castellan serve --config FILE` with extra environment variables.
    pub fn serve_with_env(config: &Path, dir: &Path, env: &[(&str, &Path)]) -> Self {
        let mut child = castellan()
            .args(["serve", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn castellan serve");
        let base = wait_for_listening(&mut child);
        let admin_token = std::fs::read_to_string(dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            child,
            base,
            dir: dir.to_owned(),
            admin_token,
            agent: agent(),
            _tmp: None,
        }
    }

    /// Stops the server and waits for it to exit.
    pub fn stop(mut self) {
        // SIGTERM-like shutdown is not needed for these tests; the store is
        // durable at every acknowledged write.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `kill -9`: the process dies at once, mid-request (usable while
    /// other threads still talk to it).
    pub fn kill9(&self) {
        let status = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// POSTs raw bytes; returns status, content type and body JSON (Null if none).
    pub fn post_raw(&self, path: &str, body: Vec<u8>, token: Option<&str>) -> Resp {
        self.try_post(path, &body, token).expect("request sent")
    }

    /// POSTs JSON bytes; `None` when no answer came (the server died).
    pub fn try_post(&self, path: &str, body: &[u8], token: Option<&str>) -> Option<Resp> {
        let mut req = self
            .agent
            .post(self.url(path))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        req.send(body).ok().map(Resp::from)
    }

    pub fn post(&self, path: &str, body: &Value, token: Option<&str>) -> Resp {
        self.post_raw(path, body.to_string().into_bytes(), token)
    }

    pub fn post_admin(&self, path: &str, body: &Value) -> Resp {
        self.post(path, body, Some(&self.admin_token.clone()))
    }

    pub fn get(&self, path: &str, token: Option<&str>) -> Resp {
        let mut req = self.agent.get(self.url(path));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        Resp::from(req.call().expect("request sent"))
    }

    /// A GET whose body is text: status, content type, body.
    pub fn get_text(&self, path: &str) -> (u16, String, String) {
        let r = self.agent.get(self.url(path)).call().expect("request sent");
        let (status, content_type) = (r.status().as_u16(), content_type(&r));
        (
            status,
            content_type,
            r.into_body().read_to_string().unwrap_or_default(),
        )
    }

    pub fn get_admin(&self, path: &str) -> Resp {
        self.get(path, Some(&self.admin_token.clone()))
    }

    pub fn delete_admin(&self, path: &str) -> Resp {
        let req = self
            .agent
            .delete(self.url(path))
            .header("authorization", format!("Bearer {}", self.admin_token));
        Resp::from(req.call().expect("request sent"))
    }

    /// Every certificate in the inventory, following cursors.
    pub fn certificates(&self) -> Vec<Value> {
        self.paged("/api/v1/certificates")
    }

    /// Every audit entry.
    pub fn audit(&self) -> Vec<Value> {
        self.paged("/api/v1/audit")
    }

    /// The audit log as one JSON text.
    pub fn audit_text(&self) -> String {
        Value::Array(self.audit()).to_string()
    }

    /// Whether any file under the data directory holds `needle` (to show a
    /// secret was never written).
    pub fn store_bytes_contain(&self, needle: &[u8]) -> bool {
        fn walk(dir: &Path, needle: &[u8]) -> bool {
            std::fs::read_dir(dir).unwrap().any(|e| {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, needle)
                } else {
                    let bytes = std::fs::read(&p).unwrap_or_default();
                    p.file_name().is_some_and(|n| n != "admin.token")
                        && bytes.windows(needle.len()).any(|w| w == needle)
                }
            })
        }
        walk(&self.dir, needle)
    }

    fn paged(&self, path: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let q = match &cursor {
                Some(c) => format!("{path}?limit=1000&cursor={c}"),
                None => format!("{path}?limit=1000"),
            };
            let r = self.get_admin(&q);
            assert_eq!(r.status, 200, "{path}: {}", r.body);
            out.extend(r.body["items"].as_array().unwrap().iter().cloned());
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }

    /// Creates an API token over the admin API; returns the token.
    pub fn token(&self, name: &str, role: &str, groups: &[&str]) -> String {
        let r = self.post_admin(
            "/api/v1/tokens",
            &json!({ "name": name, "role": role, "groups": groups }),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["token"].as_str().unwrap().to_owned()
    }

    /// PUTs raw bytes with the admin token.
    pub fn put_admin(&self, path: &str, body: Vec<u8>) -> Resp {
        let req = self
            .agent
            .put(self.url(path))
            .header("authorization", format!("Bearer {}", self.admin_token))
            .header("content-type", "application/gzip");
        Resp::from(req.send(body).expect("request sent"))
    }

    /// POSTs a form (application/x-www-form-urlencoded).
    pub fn post_form(&self, path: &str, form: &[(&str, &str)], token: Option<&str>) -> Resp {
        self.post_form_with(path, form, token, &[])
    }

    /// POSTs a form with extra headers.
    pub fn post_form_with(
        &self,
        path: &str,
        form: &[(&str, &str)],
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut req = self.agent.post(self.url(path));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Resp::from(req.send_form(form.iter().copied()).expect("request sent"))
    }

    /// POSTs with extra headers.
    pub fn post_with(&self, path: &str, body: &Value, token: Option<&str>, headers: &[(&str, &str)]) -> Resp {
        let mut req = self
            .agent
            .post(self.url(path))
            .header("content-type", "application/json");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Resp::from(req.send(body.to_string().into_bytes()).expect("request sent"))
    }

    /// Registers a trust source for `cluster` over the API; returns its id.
    pub fn add_trust_source(&self, name: &str, cluster: &Cluster) -> String {
        let r = self.post_admin(
            "/api/v1/trust-sources",
            &json!({
                "name": name, "method": "k8s_sat", "issuer": cluster.issuer,
                "audiences": [cluster.audience], "jwks": cluster.jwks(),
            }),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().unwrap().to_owned()
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// A copy of the default policy bundle with `edit` applied to its data.json.
pub fn policies_with(root: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data.json")).unwrap()).unwrap();
    edit(&mut data);
    std::fs::write(dir.join("data.json"), data.to_string()).unwrap();
    dir
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub content_type: String,
    pub body: Value,
}

/// A response's `content-type`, or "".
fn content_type(r: &ureq::http::Response<ureq::Body>) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

impl From<ureq::http::Response<ureq::Body>> for Resp {
    fn from(r: ureq::http::Response<ureq::Body>) -> Self {
        let (status, content_type) = (r.status().as_u16(), content_type(&r));
        let text = r.into_body().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            content_type,
            body,
        }
    }
}

impl Resp {
    /// Asserts an RFC 9457 problem with this status and type slug.
    pub fn assert_problem(&self, status: u16, slug: &str) {
        assert_eq!(self.status, status, "body: {}", self.body);
        assert_eq!(
            self.content_type, "application/problem+json",
            "body: {}",
            self.body
        );
        assert_eq!(
            self.body["type"],
            format!("urn:castellan:problem:{slug}"),
            "body: {}",
            self.body
        );
        assert_eq!(self.body["status"], status);
        assert!(self.body["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(self.body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    }
}

/// A fake Kubernetes cluster: a signing key and its issuer.
pub struct Cluster {
    pub key: KeyPair,
    pub kid: String,
    pub issuer: String,
    pub audience: String,
    /// When set, tokens are RSA-signed with this algorithm (RS256, PS256, …).
    rsa: Option<(rsa::RsaPrivateKey, jsonwebtoken::Algorithm)>,
}

impl Cluster {
    pub fn new(issuer: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self {
            key,
            kid: "cluster-key-1".into(),
            issuer: issuer.into(),
            audience: "castellan".into(),
            rsa: None,
        }
    }

    /// A cluster signing with a fresh 2048-bit RSA key, as most real clusters do.
    pub fn new_rsa(issuer: &str, alg: jsonwebtoken::Algorithm) -> Self {
        let rsa_key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let mut c = Self::new(issuer);
        c.kid = "cluster-rsa-1".into();
        c.rsa = Some((rsa_key, alg));
        c
    }

    pub fn jwk(&self) -> Value {
        if let Some((k, _)) = &self.rsa {
            use rsa::traits::PublicKeyParts;
            return json!({
                "kty": "RSA", "kid": self.kid, "use": "sig",
                "n": URL_SAFE_NO_PAD.encode(k.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(k.e().to_bytes_be()),
            });
        }
        let raw = self.key.public_key_raw();
        json!({
            "kty": "EC", "crv": "P-256", "kid": self.kid, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        })
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.jwk()] })
    }

    /// Claims of a projected service-account token, valid for ten minutes.
    pub fn claims(&self, ns: &str, sa: &str) -> Value {
        let now = now();
        json!({
            "iss": self.issuer, "aud": [self.audience],
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "iat": now, "nbf": now, "exp": now + 600,
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": sa, "uid": "6a1b0c7e-0000-4000-8000-000000000001"},
                "pod": {"name": format!("{sa}-7d9f8"), "uid": "6a1b0c7e-0000-4000-8000-000000000002"},
            },
        })
    }

    /// Signs `claims` with ES256 under this cluster's kid.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(claims, &self.kid)
    }

    pub fn sign_with_kid(&self, claims: &Value, kid: &str) -> String {
        let (alg, key) = match &self.rsa {
            Some((k, alg)) => {
                use rsa::pkcs8::EncodePrivateKey;
                let pem = k.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
                (
                    *alg,
                    jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
                )
            }
            None => (
                jsonwebtoken::Algorithm::ES256,
                jsonwebtoken::EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap(),
            ),
        };
        let mut header = jsonwebtoken::Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.sign(&self.claims(ns, sa))
    }
}

/// A key an agent holds: its public JWK, RFC 7638 thumbprint and DPoP
/// proofs (RFC 9449) signed with it.
pub struct AgentKey {
    pub key: KeyPair,
    pub jwk: Value,
}

impl AgentKey {
    pub fn new() -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = key.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])});
        Self { key, jwk }
    }

    /// The thumbprint a token bound to this key carries in `cnf.jkt`.
    pub fn jkt(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            self.jwk["x"].as_str().unwrap(),
            self.jwk["y"].as_str().unwrap()
        );
        URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    }

    /// A DPoP proof for `POST url`, with the hash of `token` if given.
    pub fn proof(&self, url: &str, token: Option<&str>) -> String {
        let mut claims =
            json!({"jti": uuid::Uuid::new_v4().to_string(), "htm": "POST", "htu": url, "iat": now()});
        if let Some(t) = token {
            claims["ath"] = URL_SAFE_NO_PAD
                .encode(ring::digest::digest(&ring::digest::SHA256, t.as_bytes()).as_ref())
                .into();
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(serde_json::from_value(self.jwk.clone()).unwrap());
        let signing = jsonwebtoken::EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &signing).unwrap()
    }
}

/// The claims of a JWT, unverified.
pub fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A fresh P-256 key and a CSR for it.
pub fn csr() -> (KeyPair, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (key, pem)
}

/// The attested-issuance request body.
pub fn issuance_body(token: &str, csr: &str, ttl: Option<u64>) -> Value {
    let mut b = json!({ "method": "k8s_sat", "evidence": token, "csr": csr });
    if let Some(t) = ttl {
        b["ttl_seconds"] = t.into();
    }
    b
}

/// Polls until `f` is true or the timeout passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// DER certificates from a PEM text.
pub fn pem_certs(pem_text: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = pem_text.as_bytes();
    while let Ok((r, pem)) = x509_parser::pem::parse_x509_pem(rest) {
        out.push(pem.contents);
        rest = r;
        if rest.iter().all(|b| b.is_ascii_whitespace()) {
            break;
        }
    }
    out
}

/// Our own uid, as the kernel reports it to the Workload API.
pub fn my_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
