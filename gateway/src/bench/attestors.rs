//! `castellan bench attestors`: attested issuances per second for each
//! attestation method through the HTTP endpoint, against a `castellan dev`
//! server (it pushes a copy of the default policy bundle whose data allows
//! the bench's identities, and puts the embedded bundle back at the end).
//!
//! Evidence is made before the clock starts, in each method's real format:
//! tokens signed by a key the bench registers as a trust source, AWS
//! documents signed by a certificate it registers, join tokens from the
//! admin API, x509pop answers to challenges fetched beforehand. What is
//! measured is the issuance request only.
//!
//! `tpm` is in the table when a TPM is named (`--tpm-tcti`, with the CA
//! certificates of its EK's manufacturer, else the EK is enrolled by its
//! hash): the bench answers a challenge per
//! request with it — an ActivateCredential and a quote each, bound to that
//! request's CSR key — before the clock starts. Challenges live five
//! minutes, so preparing must finish well within that.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use rcgen::KeyPair;
use serde_json::{Value, json};

use castellan::client::{Conn, Endpoint};
use castellan::dev::p256_jwk;
use castellan::util::now_unix;

/// What to run.
pub struct Options {
    pub endpoint: Endpoint,
    pub admin_token: String,
    pub concurrency: usize,
    pub requests: usize,
    /// The methods to measure, by name; empty for all.
    pub methods: Vec<String>,
    /// The TPM for the `tpm` row.
    pub tpm: Option<TpmTarget>,
    pub server_pid: Option<u32>,
}

/// A TPM to measure the `tpm` method with.
pub struct TpmTarget {
    /// Its TCTI, e.g. `swtpm:host=127.0.0.1,port=2321`.
    pub tcti: String,
    /// PEM certificates of its EK's manufacturer (root and intermediates)
    /// for the bench's `tpm` trust source; without them the source enrolls
    /// the TPM's EK by its hash instead.
    pub ek_ca_pem: Option<String>,
}

/// How the bench's user names another TPM, for errors.
#[cfg(feature = "tpm")]
const TPM_CHOOSE: &str = "choose one with --tpm-tcti";

/// The PCRs each bench quote covers (as `castellan tpm evidence` does by
/// default).
#[cfg(feature = "tpm")]
const TPM_PCRS: [u32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

/// Preparing TPM proofs must end by then, so that none of their
/// challenges expires while the measured requests run.
#[cfg(feature = "tpm")]
const TPM_PREPARE_BUDGET_SECONDS: u64 = 240;

/// One method's figures.
pub struct Row {
    pub method: &'static str,
    pub report: super::Report,
}

async fn admin(
    conn: &mut Conn,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (status, resp) = conn
        .send(
            method,
            path,
            Some(token),
            body.map(|b| Bytes::from(b.to_string())),
        )
        .await?;
    anyhow::ensure!(
        status.is_success(),
        "{path}: {status} {}",
        String::from_utf8_lossy(&resp)
    );
    Ok(serde_json::from_slice(&resp).unwrap_or(Value::Null))
}

/// The default bundle with data that lets the bench's identities through
/// (and the bench TPM, named by its EK's SHA-256, when there is one).
fn bench_bundle(tpm_ek_sha256: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let mut bundle = castellan::bundle::Bundle::embedded();
    let data = bundle
        .files
        .get("data.json")
        .context("the default bundle has data.json")?;
    let mut data: Value = serde_json::from_slice(data)?;
    let issuance = &mut data["castellan"]["issuance"];
    issuance["github_oidc"]["allow"] = json!([{"repository": "bench/app"}]);
    issuance["gcp_iit"]["allowed_projects"] = json!(["bench-project"]);
    issuance["azure_msi"]["allow"] = json!([{"tenant": "bench-tenant"}]);
    issuance["aws_iid"]["allowed_accounts"] = json!(["111122223333"]);
    if let Some(ek) = tpm_ek_sha256 {
        issuance["tpm"]["allowed_ek_sha256"] = json!([ek]);
    }
    bundle
        .files
        .insert("data.json".into(), serde_json::to_vec(&data)?);
    Ok(bundle.to_tar_gz()?)
}

fn csr() -> anyhow::Result<String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    Ok(rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?)
}

fn body(method: &str, evidence: &str) -> anyhow::Result<Bytes> {
    Ok(Bytes::from(
        json!({ "method": method, "evidence": evidence, "csr": csr()? }).to_string(),
    ))
}

/// Claims of the `i`-th token of a JWT method.
fn jwt_claims(method: &str, issuer: &str, i: usize) -> Value {
    let now = now_unix();
    let mut c = json!({
        "iss": issuer, "aud": "castellan-bench", "iat": now, "exp": now + 600,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    match method {
        "github_oidc" => {
            for (k, v) in [
                ("repository", "bench/app"),
                ("repository_owner", "bench"),
                ("ref", "refs/heads/main"),
                (
                    "workflow_ref",
                    "bench/app/.github/workflows/ci.yml@refs/heads/main",
                ),
                ("event_name", "push"),
            ] {
                c[k] = v.into();
            }
        }
        "gcp_iit" => {
            c["google"] = json!({"compute_engine": {
                "project_id": "bench-project", "zone": "europe-west1-b",
                "instance_id": format!("{i}"), "instance_name": format!("vm-{i}"),
            }});
        }
        _ => {
            c["tid"] = "bench-tenant".into();
            c["oid"] = format!("principal-{i}").into();
            c["xms_mirid"] =
                "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/virtualMachines/vm".into();
        }
    }
    c
}

/// Evidence for `n` issuances of `method`, and the trust source to delete after.
async fn prepare(
    conn: &mut Conn,
    opts: &Options,
    method: &'static str,
) -> anyhow::Result<(Vec<Bytes>, Option<String>)> {
    let (token, n) = (opts.admin_token.as_str(), opts.requests);
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    match method {
        "tpm" => {
            let target = opts.tpm.as_ref().context("no TPM to measure")?;
            let mut spec = json!({"name": format!("bench-tpm-{tag}"), "method": "tpm"});
            match &target.ek_ca_pem {
                Some(pem) => spec["certificates"] = pem.as_str().into(),
                None => {
                    let ek = tpm_ek_sha256(&target.tcti).await?;
                    spec["settings"] = json!({ "enrolled_ek_sha256": [ek] });
                }
            }
            let source = admin(conn, token, Method::POST, "/api/v1/trust-sources", Some(spec)).await?;
            let id = source["id"].as_str().map(str::to_owned);
            match tpm_proofs(&opts.endpoint, &target.tcti, n).await {
                Ok(bodies) => Ok((bodies, id)),
                Err(e) => {
                    if let Some(id) = id {
                        let path = format!("/api/v1/trust-sources/{id}");
                        let _ = admin(conn, token, Method::DELETE, &path, None).await;
                    }
                    Err(e)
                }
            }
        }
        "github_oidc" | "gcp_iit" | "azure_msi" => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let kid = format!("bench-{tag}");
            let issuer = format!("https://{method}-{tag}.bench.invalid");
            let source = admin(
                conn,
                token,
                Method::POST,
                "/api/v1/trust-sources",
                Some(json!({"name": kid, "method": method, "issuer": issuer,
                            "audiences": ["castellan-bench"], "jwks": {"keys": [p256_jwk(&key, &kid)]}})),
            )
            .await?;
            let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.kid = Some(kid);
            let mut bodies = Vec::with_capacity(n);
            for i in 0..n {
                let jwt = jsonwebtoken::encode(&header, &jwt_claims(method, &issuer, i), &encoding)?;
                bodies.push(body(method, &jwt)?);
            }
            Ok((bodies, source["id"].as_str().map(str::to_owned)))
        }
        "join_token" => {
            let mut bodies = Vec::with_capacity(n);
            for i in 0..n {
                let t = admin(
                    conn,
                    token,
                    Method::POST,
                    "/api/v1/join-tokens",
                    Some(json!({"name": format!("bench-{tag}-{i}")})),
                )
                .await?;
                bodies.push(body(method, t["token"].as_str().unwrap_or_default())?);
            }
            Ok((bodies, None))
        }
        "aws_iid" => {
            use rsa::pkcs8::EncodePrivateKey as _;
            let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)?;
            let pkcs8 = private.to_pkcs8_der()?;
            let pem = private.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)?;
            let kp = KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256)?;
            let cert = rcgen::CertificateParams::new(Vec::<String>::new())?.self_signed(&kp)?;
            let signer = ring::signature::RsaKeyPair::from_pkcs8(pkcs8.as_bytes())
                .map_err(|e| anyhow::anyhow!("RSA key: {e}"))?;
            let source = admin(
                conn,
                token,
                Method::POST,
                "/api/v1/trust-sources",
                Some(json!({"name": format!("bench-aws-{tag}"), "method": "aws_iid", "certificates": cert.pem()})),
            )
            .await?;
            let pending =
                castellan::util::rfc3339(time::OffsetDateTime::now_utc() - time::Duration::seconds(60));
            let pending = pending
                .split('.')
                .next()
                .unwrap_or_default()
                .trim_end_matches('Z')
                .to_owned()
                + "Z";
            let mut bodies = Vec::with_capacity(n);
            for i in 0..n {
                let doc = json!({
                    "accountId": "111122223333", "region": "eu-west-1", "instanceId": format!("i-{tag}{i}"),
                    "imageId": "ami-bench", "pendingTime": pending,
                })
                .to_string();
                let mut sig = vec![0; signer.public().modulus_len()];
                signer
                    .sign(
                        &ring::signature::RSA_PKCS1_SHA256,
                        &ring::rand::SystemRandom::new(),
                        doc.as_bytes(),
                        &mut sig,
                    )
                    .map_err(|e| anyhow::anyhow!("sign: {e}"))?;
                let evidence = json!({"document": doc, "signature": STANDARD.encode(sig)}).to_string();
                bodies.push(body(method, &evidence)?);
            }
            Ok((bodies, source["id"].as_str().map(str::to_owned)))
        }
        _ => {
            // x509pop: a CA, one client certificate, challenges fetched now.
            let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = p.self_signed(&ca_key)?;
            let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key)?;
            let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name
                .push(rcgen::DnType::CommonName, format!("bench-{tag}"));
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            let leaf = p.signed_by(&leaf_key, &issuer)?;
            let source = admin(
                conn,
                token,
                Method::POST,
                "/api/v1/trust-sources",
                Some(json!({"name": format!("bench-x509-{tag}"), "method": "x509pop", "certificates": ca.pem()})),
            )
            .await?;
            let mut bodies = Vec::with_capacity(n);
            for _ in 0..n {
                let (status, resp) = conn
                    .send(
                        Method::POST,
                        "/api/v1/attestation/challenges",
                        None,
                        Some(Bytes::from(json!({"method": "x509pop"}).to_string())),
                    )
                    .await?;
                anyhow::ensure!(status == StatusCode::CREATED, "challenge: {status}");
                let c: Value = serde_json::from_slice(&resp)?;
                let csr_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let key_sha =
                    castellan::util::sha256_hex(&rcgen::PublicKeyData::subject_public_key_info(&csr_key));
                let message = format!(
                    "castellan-x509pop-v1\n{}\n{key_sha}\n",
                    c["nonce"].as_str().unwrap_or_default()
                );
                let sig = rcgen::SigningKey::sign(&leaf_key, message.as_bytes())?;
                let evidence = json!({
                    "challenge_id": c["challenge_id"], "certificates": [STANDARD.encode(leaf.der())],
                    "algorithm": "ecdsa-p256-sha256", "signature": STANDARD.encode(sig),
                })
                .to_string();
                let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
                    .serialize_request(&csr_key)?
                    .pem()?;
                bodies.push(Bytes::from(
                    json!({"method": "x509pop", "evidence": evidence, "csr": csr}).to_string(),
                ));
            }
            Ok((bodies, source["id"].as_str().map(str::to_owned)))
        }
    }
}

/// `n` issuance requests for the `tpm` method, each with a fresh CSR key and
/// the TPM's answer to its own challenge, bound to that key.
#[cfg(feature = "tpm")]
async fn tpm_proofs(endpoint: &Endpoint, tcti: &str, n: usize) -> anyhow::Result<Vec<Bytes>> {
    let runtime = tokio::runtime::Handle::current();
    let (endpoint, tcti) = (endpoint.clone(), tcti.to_owned());
    let started = Instant::now();
    let bodies = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Bytes>> {
        let mut tpm = crate::tpm::Tpm::open(&tcti, None, TPM_CHOOSE)?;
        let mut bodies = Vec::with_capacity(n);
        for _ in 0..n {
            anyhow::ensure!(
                started.elapsed().as_secs() < TPM_PREPARE_BUDGET_SECONDS,
                "{} TPM proofs took more than {TPM_PREPARE_BUDGET_SECONDS} s to make, so their \
                 challenges could expire while being measured; ask for fewer with --requests",
                bodies.len()
            );
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let key_sha256 =
                <sha2::Sha256 as sha2::Digest>::digest(rcgen::PublicKeyData::subject_public_key_info(&key));
            let evidence = tpm.answer_challenge(&runtime, &endpoint, &key_sha256, &TPM_PCRS)?;
            let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
                .serialize_request(&key)?
                .pem()?;
            bodies.push(Bytes::from(
                json!({"method": "tpm", "evidence": evidence.to_string(), "csr": csr}).to_string(),
            ));
        }
        Ok(bodies)
    })
    .await
    .context("the TPM task failed")??;
    eprintln!(
        "  made {n} TPM proofs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(bodies)
}

#[cfg(not(feature = "tpm"))]
async fn tpm_proofs(_: &Endpoint, _: &str, _: usize) -> anyhow::Result<Vec<Bytes>> {
    anyhow::bail!("this castellan was built without the `tpm` feature, so it cannot talk to a TPM")
}

/// The hex SHA-256 of the bench TPM's EK, which the bench policy allows.
#[cfg(feature = "tpm")]
async fn tpm_ek_sha256(tcti: &str) -> anyhow::Result<String> {
    let tcti = tcti.to_owned();
    tokio::task::spawn_blocking(move || crate::tpm::Tpm::open(&tcti, None, TPM_CHOOSE)?.ek_sha256())
        .await
        .context("the TPM task failed")?
}

#[cfg(not(feature = "tpm"))]
async fn tpm_ek_sha256(_: &str) -> anyhow::Result<String> {
    anyhow::bail!("this castellan was built without the `tpm` feature, so it cannot talk to a TPM")
}

/// Every method the bench can measure, in table order.
pub const METHODS: [&str; 7] = [
    "github_oidc",
    "gcp_iit",
    "azure_msi",
    "aws_iid",
    "join_token",
    "x509pop",
    "tpm",
];

/// Runs each chosen method in turn (all of them when `opts.methods` is
/// empty; `tpm` only when a TPM is named), then puts the embedded policy
/// bundle back, also when a method fails.
pub async fn run(opts: Options) -> anyhow::Result<Vec<Row>> {
    let methods: Vec<&'static str> = if opts.methods.is_empty() {
        METHODS
            .into_iter()
            .filter(|m| *m != "tpm" || opts.tpm.is_some())
            .collect()
    } else {
        let mut chosen = Vec::new();
        for name in &opts.methods {
            let m = METHODS.into_iter().find(|m| m == name).with_context(|| {
                format!("no method `{name}` to bench; choose from {}", METHODS.join(", "))
            })?;
            anyhow::ensure!(
                m != "tpm" || opts.tpm.is_some(),
                "measuring tpm needs a TPM: give --tpm-tcti"
            );
            chosen.push(m);
        }
        chosen
    };
    let mut conn = opts.endpoint.connect().await?;
    let token = opts.admin_token.as_str();
    let ek_sha256 = match &opts.tpm {
        Some(t) if methods.contains(&"tpm") => Some(tpm_ek_sha256(&t.tcti).await?),
        _ => None,
    };
    let (status, resp) = conn
        .send_with(
            Method::PUT,
            "/api/v1/bundles/default",
            Some(token),
            &[("content-type", "application/gzip".into())],
            Some(Bytes::from(bench_bundle(ek_sha256.as_deref())?)),
        )
        .await?;
    anyhow::ensure!(
        status.is_success(),
        "pushing the bench policy (needs `castellan dev`, where unsigned bundles are accepted): {status} {}",
        String::from_utf8_lossy(&resp)
    );
    let rows = measure(&mut conn, &opts, &methods).await;
    let original = castellan::bundle::Bundle::embedded().to_tar_gz()?;
    let restored = conn
        .send_with(
            Method::PUT,
            "/api/v1/bundles/default",
            Some(token),
            &[("content-type", "application/gzip".into())],
            Some(Bytes::from(original)),
        )
        .await;
    if let Err(e) = restored {
        eprintln!("could not put the embedded policy bundle back: {e:#}");
    }
    rows
}

async fn measure(conn: &mut Conn, opts: &Options, methods: &[&'static str]) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let path = "/api/v1/workloads/attested-issuance";
    for &method in methods {
        eprintln!("preparing {} {method} proofs…", opts.requests);
        let (bodies, source) = prepare(conn, opts, method).await?;
        let probe = super::cpu::Probe::new(opts.endpoint.authority(), opts.server_pid);
        let cpu_start = probe.start();
        let started = Instant::now();
        let measured = super::run_paced(
            &opts.endpoint,
            path,
            Arc::new(super::calls(bodies)),
            0,
            opts.requests,
            opts.concurrency,
            None,
        )
        .await;
        let elapsed = started.elapsed();
        let server_cpu = probe.since(cpu_start);
        if let Some(id) = source {
            let _ = conn
                .send(
                    Method::DELETE,
                    &format!("/api/v1/trust-sources/{id}"),
                    Some(&opts.admin_token),
                    None,
                )
                .await;
        }
        let (mut latencies, statuses) = measured?;
        latencies.sort();
        rows.push(Row {
            method,
            report: super::Report {
                server_cpu,
                ..super::summarise(opts.requests, latencies, &statuses, elapsed)
            },
        });
    }
    Ok(rows)
}
