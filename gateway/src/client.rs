//! A small HTTP/1.1 client for the CLI and the load generator: one
//! keep-alive connection per [`Conn`], TLS through rustls when the URL is
//! `https://` (trusting the CA file given, e.g. Castellan's own root).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// Why a request could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address is not an `http://` or `https://` URL this client takes.
    #[error("address `{url}`: {problem}")]
    Address { url: String, problem: &'static str },
    /// An `https://` address without a CA file to trust.
    #[error("an https:// address needs --ca-file (e.g. DATA_DIR/ca/bundle.pem)")]
    NoCaFile,
    /// The CA file could not be read.
    #[error("CA file {path}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("CA file {path}: {problem}")]
    CaCertificate { path: String, problem: String },
    /// The TLS configuration could not be built.
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
    /// The server could not be reached.
    #[error("cannot connect to {authority}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {authority} failed")]
    Handshake {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP")]
    Http(#[from] hyper::Error),
    /// The response body is larger than the caller accepts.
    #[error("the response body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The request could not be built (a header value that is not valid).
    #[error("invalid request")]
    Request(#[from] hyper::http::Error),
}

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
    /// `host:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Parses `http://host:port` or `https://host:port`. For https the CA
    /// file is required: Castellan's server certificate comes from its own CA.
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, ClientError> {
        let (endpoint, path) = Self::parse_url(url, ca_file)?;
        if path != "/" {
            return Err(ClientError::Address {
                url: url.to_owned(),
                problem: "must not have a path",
            });
        }
        Ok(endpoint)
    }

    /// Parses a full URL into the endpoint and its path (with query).
    pub fn parse_url(url: &str, ca_file: Option<&Path>) -> Result<(Self, String), ClientError> {
        let tls = match ca_file {
            Some(ca_file) if url.starts_with("https://") => {
                let path = ca_file.display().to_string();
                let pem = std::fs::read(ca_file).map_err(|source| ClientError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                let bad = |problem: String| ClientError::CaCertificate {
                    path: path.clone(),
                    problem,
                };
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
                    roots.add(cert).map_err(|e| bad(format!("not usable: {e}")))?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(ClientError::Tls)?
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
    ) -> Result<(Self, String), ClientError> {
        let bad = |problem| ClientError::Address {
            url: url.to_owned(),
            problem,
        };
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (rest[..i].to_owned(), rest[i..].to_owned()),
            None => (rest.to_owned(), "/".to_owned()),
        };
        if authority.is_empty() {
            return Err(bad("has no host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_owned(),
                p.parse().map_err(|_| bad("has an invalid port"))?,
            ),
            _ => (authority.clone(), if https { 443 } else { 80 }),
        };
        let tls = if https {
            let config = tls.ok_or(ClientError::NoCaFile)?;
            let name = ServerName::try_from(host.clone()).map_err(|_| bad("has an invalid server name"))?;
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
    pub async fn connect(&self) -> Result<Conn, ClientError> {
        self.connect_from(None).await
    }

    /// Connects from a given local address (a load tool telling its clients
    /// apart on loopback: 127.0.0.2 is another client than 127.0.0.1).
    pub async fn connect_from(&self, local: Option<std::net::IpAddr>) -> Result<Conn, ClientError> {
        let connect_error = |source| ClientError::Connect {
            authority: self.authority.clone(),
            source,
        };
        let tcp = match local {
            None => TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(connect_error)?,
            Some(ip) => {
                let remote = tokio::net::lookup_host((self.host.as_str(), self.port))
                    .await
                    .map_err(connect_error)?
                    .next()
                    .ok_or_else(|| connect_error(std::io::Error::other("no address")))?;
                let socket = if ip.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .map_err(connect_error)?;
                socket.bind((ip, 0).into()).map_err(connect_error)?;
                socket.connect(remote).await.map_err(connect_error)?
            }
        };
        tcp.set_nodelay(true).map_err(connect_error)?;
        let sender =
            match &self.tls {
                Some((connector, name)) => {
                    let tls = connector.connect(name.clone(), tcp).await.map_err(|source| {
                        ClientError::Handshake {
                            authority: self.authority.clone(),
                            source,
                        }
                    })?;
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

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Full<Bytes>>, ClientError>
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
    ) -> Result<(StatusCode, Bytes), ClientError> {
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
    ) -> Result<(StatusCode, Bytes), ClientError> {
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
        if body.is_some()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// GETs `path`, reading at most `limit` bytes of the answer: a larger
    /// one is refused while it arrives, never buffered whole.
    pub async fn get_limited(
        &mut self,
        path: &str,
        limit: usize,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", &self.authority)
            .body(Full::new(Bytes::new()))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let limited = http_body_util::Limited::new(resp.into_body(), limit);
        let bytes = limited
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(h) => ClientError::Http(*h),
                Err(_) => ClientError::TooLarge { limit },
            })?
            .to_bytes();
        Ok((status, bytes))
    }
}

/// Turns a problem+json body into one readable line.
pub fn problem_line(status: hyper::StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(p) => {
            let mut line = format!(
                "{} {}: {}",
                status.as_u16(),
                p["type"]
                    .as_str()
                    .and_then(|t| t.strip_prefix(crate::model::PROBLEM_TYPE_PREFIX))
                    .unwrap_or("error"),
                p["detail"].as_str().unwrap_or("")
            );
            // A refusal an operator can ask about: `castellan explain --refusal ID`.
            if status.as_u16() == 403
                && let Some(id) = p["request_id"].as_str()
            {
                line.push_str(&format!(" (request id {id})"));
            }
            line
        }
        Err(_) => format!("{status}"),
    }
}
