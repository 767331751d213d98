//! `tool-server --castellan URL --listen HOST:PORT`: the toy tool server.

use std::sync::Arc;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .map(|w| w[1].clone())
        .unwrap_or_else(|| default.to_owned())
}

fn main() -> std::process::ExitCode {
    let castellan = arg("--castellan", "http://127.0.0.1:8443");
    let listen = arg("--listen", "127.0.0.1:9090");
    let listener = match std::net::TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let base = format!("http://{listen}");
    let verifier = match castellan_client::Verifier::discover(&castellan, &base) {
        Ok(v) => Arc::new(v),
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    castellan_example_agent::serve_tools(listener, base.clone(), verifier.clone());
    println!("tool server on {base} (audience {base}); polling revocations every 5 s");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(5));
        if let Err(e) = verifier.refresh_revocations() {
            eprintln!("revocation feed: {e}");
        }
    }
}
