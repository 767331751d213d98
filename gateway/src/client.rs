//! A small HTTP/1.1 client for the CLI and the load generator: one
//! keep-alive connection per [`Conn`], TLS through rustls when the URL is
//! `https://` (trusting the CA file given, e.g. Castellan's own root).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// Where the server is.
#[derive(Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    authority: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

/// One open connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
}

impl Endpoint {
    /// Parses `http://host:port` or `https://host:port`. For https the CA
    /// file is required: Castellan's server certificate comes from its own CA.
    pub fn parse(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let (endpoint, path) = Self::parse_url(url, ca_file)?;
        anyhow::ensure!(path == "/", "address `{url}` must not have a path");
        Ok(endpoint)
    }

    /// Parses a full URL into the endpoint and its path (with query).
    pub fn parse_url(url: &str, ca_file: Option<&Path>) -> anyhow::Result<(Self, String)> {
        let tls = match ca_file {
            Some(ca_file) if url.starts_with("https://") => {
                let pem = std::fs::read(ca_file).with_context(|| format!("{}", ca_file.display()))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    roots
                        .add(cert.context("CA file is not PEM")?)
                        .context("CA certificate not usable")?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(Arc::new(config))
            }
            _ => None,
        };
        Self::parse_url_with(url, tls)
    }

    /// Parses a full URL; an `https://` one uses the TLS configuration given.
    pub fn parse_url_with(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<(Self, String)> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            anyhow::bail!("address `{url}` must start with http:// or https://");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (rest[..i].to_owned(), rest[i..].to_owned()),
            None => (rest.to_owned(), "/".to_owned()),
        };
        anyhow::ensure!(!authority.is_empty(), "address `{url}` has no host");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                p.parse().context("invalid port")?,
            ),
            _ => (authority.clone(), if https { 443 } else { 80 }),
        };
        let tls = if https {
            let config = tls.context("an https:// address needs --ca-file (e.g. DATA_DIR/ca/root.crt)")?;
            let name = ServerName::try_from(host.clone()).context("invalid server name")?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        } else {
            None
        };
        Ok((
            Self {
                host,
                port,
                authority,
                tls,
            },
            path,
        ))
    }

    /// Opens a connection.
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot connect to {}", self.authority))?;
        tcp.set_nodelay(true)?;
        let sender = match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS handshake failed")?;
                handshake(TokioIo::new(tls)).await?
            }
            None => handshake(TokioIo::new(tcp)).await?,
        };
        Ok(Conn {
            sender,
            authority: self.authority.clone(),
        })
    }
}

async fn handshake<T>(io: TokioIo<T>) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

impl Conn {
    /// Sends one request and reads the whole response.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send_with(method, path, token, &[], body).await
    }

    /// Sends one request with extra headers and reads the whole response.
    pub async fn send_with(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, String)],
        body: Option<Bytes>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        self.sender.ready().await.context("connection closed")?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}
