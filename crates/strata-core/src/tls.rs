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

/// Loads the files into a server config for HTTP/1.1. With `client_ca`, a
/// client that presents a certificate must present one signed by that CA
/// (or the handshake fails); one that presents none gets through as
/// [`Caller::Anonymous`], so a kubelet's HTTPS probe can read `/health` while
/// every other route is the server's to refuse (mutual TLS).
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
            .allow_unauthenticated()
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

/// The name every replica's certificate carries and the gateway checks,
/// whatever address it dials: on Kubernetes a replica is reached by its Pod
/// address, which no certificate made before the Pod can name.
pub const REPLICA_SERVER_NAME: &str = "strata-replica";

/// The address a connection came from, in every request's extensions (put
/// there by [`serve`]). Behind a proxy it is the proxy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(pub std::net::SocketAddr);

/// Who is at the other end of a connection, as the listener knows it: put
/// into every request's extensions by [`serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A TLS client whose certificate the server's client CA signed.
    Verified,
    /// Plain HTTP, or TLS without a client certificate.
    Anonymous,
}

/// Certificates strata makes for its own replicas: a private CA, one server
/// certificate for the replicas ([`REPLICA_SERVER_NAME`] and loopback names)
/// and one client certificate for the gateway, all signed by the CA. The
/// replicas get the CA and their own pair; only gateways get the client pair.
#[derive(Debug, Clone)]
pub struct ReplicaPki {
    pub ca_cert: PathBuf,
    pub server: TlsFiles,
    pub client: TlsFiles,
}

impl ReplicaPki {
    /// Makes the CA and certificates in `dir` once; reuses them after.
    /// Processes that start together (a cluster's controllers) may all
    /// call this: each writes a whole set in a directory of its own and
    /// renames it into place, so every one ends up with the one set that
    /// got there first.
    pub fn ensure(dir: &Path) -> Result<ReplicaPki, TlsError> {
        let pki = ReplicaPki::at(dir);
        if pki.complete() {
            return Ok(pki);
        }
        let io = |e: std::io::Error| TlsError::Config(format!("{}: {e}", dir.display()));
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let staging = dir.with_file_name(format!(
            ".{name}.{}.{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir(&staging).map_err(io)?;
        let made = ReplicaPki::make(&staging);
        let placed = made.and_then(|_| {
            // Onto nothing, or an empty directory: atomic. Onto a set another
            // process placed first: refused, and that set is the one.
            match std::fs::rename(&staging, dir) {
                Ok(()) => Ok(()),
                Err(_) if pki.complete() => Ok(()),
                Err(e) => Err(io(e)),
            }
        });
        let _ = std::fs::remove_dir_all(&staging);
        placed.map(|_| pki)
    }

    /// Whether every file is there.
    fn complete(&self) -> bool {
        [
            &self.ca_cert,
            &self.server.cert,
            &self.server.key,
            &self.client.cert,
            &self.client.key,
        ]
        .iter()
        .all(|p| p.is_file())
    }

    /// A new CA and its two leaves, written in `dir`.
    fn make(dir: &Path) -> Result<(), TlsError> {
        let pki = ReplicaPki::at(dir);
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
            vec![
                REPLICA_SERVER_NAME.into(),
                "127.0.0.1".into(),
                "localhost".into(),
            ],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            &pki.server,
        )?;
        leaf(
            vec!["strata-gateway".into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            &pki.client,
        )?;
        std::fs::write(&pki.ca_cert, ca.pem())
            .map_err(|e| TlsError::Certificate(pki.ca_cert.clone(), e.to_string()))
    }
}

impl ReplicaPki {
    /// The files of a directory laid out as [`ReplicaPki::ensure`] writes it
    /// (e.g. a Kubernetes Secret mounted there); not checked here.
    pub fn at(dir: &Path) -> ReplicaPki {
        ReplicaPki {
            ca_cert: dir.join("ca.pem"),
            server: TlsFiles {
                cert: dir.join("replica.pem"),
                key: dir.join("replica-key.pem"),
            },
            client: TlsFiles {
                cert: dir.join("gateway.pem"),
                key: dir.join("gateway-key.pem"),
            },
        }
    }

    /// The gateway's side: trusts only the replica CA, checks the replica's
    /// certificate for [`REPLICA_SERVER_NAME`] whatever address was dialled,
    /// and presents the gateway's client certificate. No ALPN: HTTP/1.1,
    /// and hyper-rustls sets its own.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(&self.ca_cert)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Certificate(self.ca_cert.clone(), e.to_string()))?;
        }
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_file(&self.client.key)
            .map_err(|e| TlsError::Key(self.client.key.clone(), e.to_string()))?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ReplicaName { inner }))
            .with_client_auth_cert(load_certs(&self.client.cert)?, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(config)
    }
}

/// Verifies a replica's chain against the replica CA for
/// [`REPLICA_SERVER_NAME`], not for the name or address the client dialled.
#[derive(Debug)]
struct ReplicaName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for ReplicaName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &rustls_pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let name = rustls_pki_types::ServerName::try_from(REPLICA_SERVER_NAME)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
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
    let peer = stream.peer_addr().ok().map(Peer);
    let Some(acceptor) = tls else {
        return http(TokioIo::new(stream), app, Caller::Anonymous, peer, closing).await;
    };
    let mut first = [0u8; 1];
    // 0x16 starts a TLS handshake record.
    let is_tls = matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
    if is_tls {
        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => {
                // The verifier has checked any certificate the client showed.
                let caller = match tls_stream.get_ref().1.peer_certificates() {
                    Some(certs) if !certs.is_empty() => Caller::Verified,
                    _ => Caller::Anonymous,
                };
                http(TokioIo::new(tls_stream), app, caller, peer, closing).await
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    } else if require_tls {
        refuse_plain(stream).await;
    } else {
        http(TokioIo::new(stream), app, Caller::Anonymous, peer, closing).await;
    }
}

async fn http<I>(io: I, app: Router, caller: Caller, peer: Option<Peer>, closing: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let app = app.map_request(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(caller);
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        req
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gateway_and_a_replica_of_one_set_shake_hands_whatever_address_is_dialled() {
        let dir = tempfile::tempdir().unwrap();
        let place = dir.path().join("tls").join("replicas");
        // Controllers starting together each make a set; one set wins.
        let makers: Vec<_> = (0..4)
            .map(|_| {
                let place = place.clone();
                std::thread::spawn(move || ReplicaPki::ensure(&place).map(|_| ()))
            })
            .collect();
        for m in makers {
            m.join().unwrap().unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(dir.path().join("tls"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["replicas"], "staging directories left behind");
        let pki = ReplicaPki::ensure(&place).unwrap();
        let handshake = |client: rustls::ClientConfig| {
            let acceptor = acceptor(&pki.server, Some(&pki.ca_cert)).unwrap();
            async move {
                let (a, b) = tokio::io::duplex(64 * 1024);
                let server = tokio::spawn(async move {
                    let s = acceptor.accept(b).await.ok()?;
                    Some(s.get_ref().1.peer_certificates().is_some())
                });
                let name = rustls_pki_types::ServerName::try_from("10.9.8.7").unwrap();
                let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
                let client = connector.connect(name, a).await;
                let verified = server.await.unwrap();
                (client.is_ok(), verified)
            }
        };
        // The Pod address is in no certificate: the replica name is checked.
        assert_eq!(
            handshake(pki.client_config().unwrap()).await,
            (true, Some(true))
        );
        // Another set's gateway certificate is refused by this replica, and
        // this replica's certificate is refused by the other set's gateway.
        let other = ReplicaPki::ensure(&dir.path().join("other")).unwrap();
        let (_, verified) = handshake(other.client_config().unwrap()).await;
        assert_ne!(verified, Some(true));
        let (client_ok, _) = handshake(other.client_config().unwrap()).await;
        assert!(!client_ok);
    }
}
