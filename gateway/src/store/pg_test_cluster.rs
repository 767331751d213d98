//! A throwaway PostgreSQL cluster for the tests: `initdb` into a temporary
//! directory and `postgres` on a free loopback port, run as the `postgres`
//! user when the tests run as root (`initdb` refuses root). The server is
//! started from a thread that lives as long as the test process and dies
//! with it (`setpriv --pdeathsig`), so nothing is left running; the data
//! directories of earlier test processes are removed at the next start.
//! Each test gets its own database. The server also speaks TLS, with a
//! certificate for `localhost` from a CA of its own ([`tls_ca`]).

#![cfg(test)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

struct Cluster {
    port: u16,
    ca: PathBuf,
}

/// The directory of PostgreSQL's programs (Debian keeps them per version).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("scripts/setup.sh installs PostgreSQL (/usr/lib/postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an installed PostgreSQL version")
}

/// `program args…`, as the postgres user when we are root.
fn as_postgres(program: &Path, owner: Option<(u32, u32)>) -> Command {
    match owner {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--pdeathsig=KILL")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Removes the clusters of test processes that have ended.
fn remove_stale() {
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("castellan-pg-")) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn start() -> Cluster {
    let bin = bin_dir();
    remove_stale();
    let root = std::env::temp_dir().join(format!("castellan-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    std::fs::create_dir_all(&root).unwrap();
    let owner = nix::unistd::geteuid().is_root().then(|| {
        let user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a `postgres` user (Debian's postgresql package makes it)");
        (user.uid.as_raw(), user.gid.as_raw())
    });
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&root, Some(uid), Some(gid)).unwrap();
    }
    let out = as_postgres(&bin.join("initdb"), owner)
        .args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "castellan",
            "--auth=trust",
            "-E",
            "UTF8",
        ])
        .args(["--no-sync", "--wal-segsize=1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = root.join("ca.pem");
    let (cert, key) = (root.join("server.crt"), root.join("server.key"));
    write_tls_files(&ca, &cert, &key, owner);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = as_postgres(&bin.join("postgres"), owner);
    server
        .args(["-D", data.to_str().unwrap(), "-p", &port.to_string()])
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("unix_socket_directories={}", root.display()),
        ])
        .args([
            "-c",
            "ssl=on",
            "-c",
            &format!("ssl_cert_file={}", cert.display()),
            "-c",
            &format!("ssl_key_file={}", key.display()),
        ])
        .args([
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
            "-c",
            "max_wal_size=32MB",
            "-c",
            "min_wal_size=2MB",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(root.join("postgres.log")).unwrap());
    // The thread that spawns the server never ends: the server's parent-death
    // signal fires when the test process does.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let child = server.spawn();
        let _ = tx.send(child.map(|_| ()));
        loop {
            std::thread::park();
        }
    });
    rx.recv().unwrap().expect("start postgres");
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin(port).is_err() {
        assert!(
            Instant::now() < deadline,
            "postgres did not start: see {}",
            root.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Cluster { port, ca }
}

/// A CA, and a server certificate and key for `localhost` under it; the
/// key readable only by the server's user (PostgreSQL insists).
fn write_tls_files(ca_path: &Path, cert_path: &Path, key_path: &Path, owner: Option<(u32, u32)>) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "castellan test database CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), &ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(ca_path, ca_cert.pem()).unwrap();
    std::fs::write(cert_path, server.pem()).unwrap();
    std::fs::write(key_path, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Some((uid, gid)) = owner {
        for p in [cert_path, key_path] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
        }
    }
}

fn config(port: u16, dbname: &str) -> postgres::Config {
    let mut c = postgres::Config::new();
    c.host("127.0.0.1").port(port).user("castellan").dbname(dbname);
    c
}

fn admin(port: u16) -> Result<postgres::Client, postgres::Error> {
    config(port, "postgres").connect(postgres::NoTls)
}

/// A fresh, empty database on the shared test cluster, as a URL (for the
/// end-to-end tests, which include this file).
#[allow(dead_code)]
pub(super) fn database_url() -> String {
    let c = database();
    let port = c.get_ports()[0];
    let name = c.get_dbname().unwrap_or_default();
    format!("postgres://castellan@127.0.0.1:{port}/{name}")
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The CA the test cluster's TLS certificate (for `localhost`) chains to.
#[allow(dead_code)]
pub(super) fn tls_ca() -> PathBuf {
    database();
    CLUSTER.get().unwrap().ca.clone()
}

/// A fresh, empty database on the shared test cluster.
pub(super) fn database() -> postgres::Config {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // The blocking client must not run inside the test's async runtime.
    std::thread::spawn(|| {
        let cluster = CLUSTER.get_or_init(start);
        let name = format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed));
        admin(cluster.port)
            .unwrap()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        config(cluster.port, &name)
    })
    .join()
    .unwrap()
}
