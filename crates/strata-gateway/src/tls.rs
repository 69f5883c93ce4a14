//! The gateway's listener: HTTP/1.1 over TLS (rustls) when certificates are
//! configured, plain HTTP otherwise. With TLS on, the first byte of each
//! connection tells a TLS handshake from a plain request; `require_tls`
//! answers the latter with one OpenAI-shaped 400 and closes it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use strata_core::ApiError;
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

/// Loads the files into a server config for HTTP/1.1.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| TlsError::Certificate(files.cert.clone(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Certificate(files.cert.clone(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate(
            files.cert.clone(),
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
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
    let mut key = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&files.key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    key.write_all(made.key_pair.serialize_pem().as_bytes())
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
