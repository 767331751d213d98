//! Test support (feature `testing`), for this crate's tests and the
//! gateway's end-to-end tests. A software TPM per test: a local CA that plays the TPM manufacturer,
//! `swtpm_setup` to manufacture a TPM with an EK certificate from that CA,
//! and `swtpm socket` serving it on its own pair of TCP ports. Everything
//! lives in a temporary directory removed on drop, and swtpm is killed.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A manufacturer CA made by `swtpm_localca` on first use: a self-signed
/// root and an intermediate that signs EK certificates.
pub struct Ca {
    dir: TempDir,
}

/// A running, manufactured swtpm.
pub struct SwTpm {
    child: Child,
    port: u16,
    _dir: TempDir,
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

/// Whether swtpm and its tools are installed; if not, says so for the
/// calling test (test threads carry the test's name) so a skipped TPM test
/// is never mistaken for a pass in the log.
pub fn available() -> bool {
    let found = ["swtpm", "swtpm_setup", "swtpm_localca", "tpm2_pcrextend"]
        .iter()
        .all(|tool| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !found {
        let test = std::thread::current().name().unwrap_or("a TPM test").to_owned();
        eprintln!(
            "SKIPPED {test}: swtpm, swtpm_setup, swtpm_localca or tpm2-tools is not installed (scripts/setup.sh installs them)"
        );
    }
    found
}

// === impl Ca ===

impl Default for Ca {
    fn default() -> Self {
        Self::new()
    }
}

impl Ca {
    pub fn new() -> Self {
        let dir = TempDir::new("ca");
        let ca = dir.path();
        write(
            &ca.join("localca.conf"),
            &format!(
                "statedir = {0}\nsigningkey = {0}/signkey.pem\nissuercert = {0}/issuercert.pem\ncertserial = {0}/certserial\n",
                ca.display()
            ),
        );
        write(
            &ca.join("localca.options"),
            "--platform-manufacturer Castellan\n--platform-version 1.0\n--platform-model test\n",
        );
        write(
            &ca.join("swtpm_setup.conf"),
            &format!(
                "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {0}/localca.conf\ncreate_certs_tool_options = {0}/localca.options\nactive_pcr_banks = sha256\n",
                ca.display()
            ),
        );
        Self { dir }
    }

    /// The root certificate (DER); exists once a TPM has been manufactured.
    pub fn root(&self) -> Vec<u8> {
        pem_cert(&self.dir.path().join("swtpm-localca-rootca-cert.pem"))
    }

    /// The intermediate that signs EK certificates (DER).
    pub fn intermediate(&self) -> Vec<u8> {
        pem_cert(&self.dir.path().join("issuercert.pem"))
    }
}

// === impl SwTpm ===

impl SwTpm {
    /// Manufactures a TPM with an RSA-2048 EK certificate from `ca` and
    /// starts serving it.
    pub fn manufacture(ca: &Ca) -> Self {
        let dir = TempDir::new("tpm");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let out = Command::new("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(&state)
            .args([
                "--create-ek-cert",
                "--create-platform-cert",
                "--lock-nvram",
                "--overwrite",
            ])
            .arg("--config")
            .arg(ca.dir.path().join("swtpm_setup.conf"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "swtpm_setup failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self::serve(dir)
    }

    /// A TPM straight from the factory of a vendor that writes no EK
    /// certificate.
    pub fn blank() -> Self {
        let dir = TempDir::new("tpm");
        std::fs::create_dir(dir.path().join("state")).unwrap();
        Self::serve(dir)
    }

    fn serve(dir: TempDir) -> Self {
        let state = dir.path().join("state");
        // Free ports can be taken between probing and binding; try a few.
        for _ in 0..10 {
            let port = free_port_pair();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2"])
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    /// The TCTI configuration string for tss-esapi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Extends SHA-256 PCR `pcr` with `data`, as other software on the
    /// machine would, through tpm2-tools.
    pub fn extend_pcr(&self, pcr: u32, data: &[u8; 32]) {
        let status = Command::new("tpm2_pcrextend")
            .arg(format!("{pcr}:sha256={}", hex::encode(data)))
            .env("TPM2TOOLS_TCTI", self.tcti())
            .status()
            .unwrap();
        assert!(status.success(), "tpm2_pcrextend failed");
    }

    /// Runs a tpm2-tools command against this TPM in `dir`, returning its
    /// standard output.
    pub fn tool(&self, dir: &Path, program: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(program)
            .args(args)
            .current_dir(dir)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The handles of `kind` (a `tpm2_getcap` capability such as
    /// `handles-transient`) the TPM currently holds.
    pub fn handles(&self, kind: &str) -> Vec<String> {
        let out = Command::new("tpm2_getcap")
            .arg(kind)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap();
        assert!(out.status.success(), "tpm2_getcap {kind} failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| line.trim_start_matches("- ").trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect()
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === impl TempDir ===

impl TempDir {
    pub fn new(kind: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "castellan-tpm-{}-{kind}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port P with P+1 also free (swtpm's server and control channels).
fn free_port_pair() -> u16 {
    loop {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

fn pem_cert(path: &Path) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let cert = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    cert.to_vec()
}
