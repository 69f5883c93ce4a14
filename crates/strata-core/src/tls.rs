//! The listener of the gateway and the engine: HTTP/1.1 over TLS (rustls)
//! when certificates are configured, plain HTTP otherwise; and the
//! certificates strata makes (a development certificate, the private CA of
//! its replicas for mutual TLS). With TLS on, the first byte of each
//! connection tells a TLS handshake from a plain request; `require_tls`
//! answers the latter with one OpenAI-shaped 400 and closes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::ApiError;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {0}: {1}")]
    Certificate(PathBuf, String),
    #[error("TLS private key {0}: {1}")]
    Key(PathBuf, String),
    #[error("TLS setup: {0}")]
    Config(String),
}

/// Certificate chain and private key files, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
        .map_err(|e| TlsError::Certificate(file.to_owned(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certificate(file.to_owned(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate(
            file.to_owned(),
            "no certificate in the file".into(),
        ));
    }
    Ok(certs)
}

/// Loads the files into a server config for HTTP/1.1. With `client_ca`,
/// only clients with a certificate signed by that CA get through (mutual TLS).
pub fn acceptor(files: &TlsFiles, client_ca: Option<&Path>) -> Result<TlsAcceptor, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Certificate(ca.to_owned(), e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Certificates strata makes for its own replicas: a private CA, one server
/// certificate for the replicas (loopback names) and one client certificate
/// for the gateway, all signed by the CA.
#[derive(Debug, Clone)]
pub struct ReplicaPki {
    pub ca_cert: PathBuf,
    pub server: TlsFiles,
    pub client: TlsFiles,
}

impl ReplicaPki {
    /// Makes the CA and certificates in `dir` once; reuses them after.
    pub fn ensure(dir: &Path) -> Result<ReplicaPki, TlsError> {
        let pki = ReplicaPki {
            ca_cert: dir.join("ca.pem"),
            server: TlsFiles {
                cert: dir.join("replica.pem"),
                key: dir.join("replica-key.pem"),
            },
            client: TlsFiles {
                cert: dir.join("gateway.pem"),
                key: dir.join("gateway-key.pem"),
            },
        };
        let all = [
            &pki.ca_cert,
            &pki.server.cert,
            &pki.server.key,
            &pki.client.cert,
            &pki.client.key,
        ];
        if all.iter().all(|p| p.is_file()) {
            return Ok(pki);
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| TlsError::Config(format!("{}: {e}", dir.display())))?;
        let config = |e: rcgen::Error| TlsError::Config(e.to_string());
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(config)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "strata replica CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().map_err(config)?;
        let ca = ca_params.self_signed(&ca_key).map_err(config)?;
        let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose, files: &TlsFiles| {
            let mut params = rcgen::CertificateParams::new(names).map_err(config)?;
            params.extended_key_usages = vec![usage];
            let key = rcgen::KeyPair::generate().map_err(config)?;
            let cert = params.signed_by(&key, &ca, &ca_key).map_err(config)?;
            write_private(&files.key, key.serialize_pem().as_bytes())
                .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
            std::fs::write(&files.cert, cert.pem())
                .map_err(|e| TlsError::Certificate(files.cert.clone(), e.to_string()))
        };
        leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            &pki.server,
        )?;
        leaf(
            vec!["strata-gateway".into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &pki.client,
        )?;
        std::fs::write(&pki.ca_cert, ca.pem())
            .map_err(|e| TlsError::Certificate(pki.ca_cert.clone(), e.to_string()))?;
        Ok(pki)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

/// SHA-256 of the first certificate's DER, as `AB:CD:...`.
pub fn fingerprint(cert_file: &Path) -> Result<String, TlsError> {
    let cert = CertificateDer::from_pem_file(cert_file)
        .map_err(|e| TlsError::Certificate(cert_file.to_owned(), e.to_string()))?;
    Ok(Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// A development certificate for `localhost` and `127.0.0.1` in `dir`
/// (`cert.pem`, `key.pem` with mode 0600), made once and reused after.
pub fn self_signed(dir: &Path) -> Result<TlsFiles, TlsError> {
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    if files.cert.is_file() && files.key.is_file() {
        return Ok(files);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| TlsError::Config(format!("{}: {e}", dir.display())))?;
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    write_private(&files.key, made.key_pair.serialize_pem().as_bytes())
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    std::fs::write(&files.cert, made.cert.pem())
        .map_err(|e| TlsError::Certificate(files.cert.clone(), e.to_string()))?;
    Ok(files)
}

/// How long open connections get to finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);

/// Accepts connections until `shutdown`, then lets open ones finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    require_tls: bool,
    shutdown: CancellationToken,
) {
    let mut connections = tokio::task::JoinSet::new();
    let closing = CancellationToken::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(
            stream,
            app.clone(),
            tls.clone(),
            require_tls,
            closing.clone(),
        ));
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    closing.cancel();
    let _ = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

async fn connection(
    stream: TcpStream,
    app: Router,
    tls: Option<TlsAcceptor>,
    require_tls: bool,
    closing: CancellationToken,
) {
    let Some(acceptor) = tls else {
        return http(TokioIo::new(stream), app, closing).await;
    };
    let mut first = [0u8; 1];
    // 0x16 starts a TLS handshake record.
    let is_tls = matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
    if is_tls {
        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => http(TokioIo::new(tls_stream), app, closing).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    } else if require_tls {
        refuse_plain(stream).await;
    } else {
        http(TokioIo::new(stream), app, closing).await;
    }
}

async fn http<I>(io: I, app: Router, closing: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = closing.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn refuse_plain(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt;
    // Read what the client sent first: closing with unread bytes would reset
    // the connection before it reads the answer.
    let mut request = vec![0u8; 16 * 1024];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut request)).await;
    let body = ApiError::invalid_request(
        None,
        "This gateway requires HTTPS; the request was sent as plain HTTP.",
    )
    .with_code("tls_required")
    .to_json();
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
