//! How requests reach a replica. Generation requests to plain-HTTP
//! replicas go through hyper's pooled HTTP/1 client directly; to replicas
//! behind mTLS, and probes and snapshots to all, through reqwest
//! (`replica_client`). reqwest parses the replica's URL twice per request
//! (for its redirect layer and for its response) even with redirects off:
//! about a fifth of a proxied request's instructions
//! (bench/results/peers.md).

use std::pin::Pin;
use std::time::Duration;

use axum::http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use strata_core::tls;

pub type UpstreamError = Box<dyn std::error::Error + Send + Sync>;
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// An HTTP client for replicas: with `pki`, it trusts only strata's replica
/// CA and presents the gateway's client certificate.
pub fn replica_client(
    pki: Option<&tls::ReplicaPki>,
    connect_timeout: Duration,
) -> Result<reqwest::Client, tls::TlsError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        // A replica never redirects; no redirect layer on every request.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pki) = pki {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| tls::TlsError::Certificate(p.to_owned(), e.to_string()))
        };
        let mut identity = read(&pki.client.cert)?;
        identity.extend(read(&pki.client.key)?);
        let bad = |e: reqwest::Error| tls::TlsError::Config(e.to_string());
        builder = builder
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(&read(&pki.ca_cert)?).map_err(bad)?,
            )
            .identity(reqwest::Identity::from_pem(&identity).map_err(bad)?);
    }
    builder
        .build()
        .map_err(|e| tls::TlsError::Config(e.to_string()))
}

/// Where a request for one route of one replica goes.
#[derive(Clone, Debug)]
pub enum Target {
    Plain(Uri),
    Tls(reqwest::Url),
}

impl Target {
    /// `url` as a target; `None` if it does not parse.
    pub fn parse(url: &str) -> Option<Target> {
        let url = reqwest::Url::parse(url).ok()?;
        Some(if url.scheme() == "http" {
            Target::Plain(url.as_str().parse().ok()?)
        } else {
            Target::Tls(url)
        })
    }
}

#[derive(Clone)]
pub struct Upstreams {
    plain: Client<HttpConnector, Full<Bytes>>,
    tls: reqwest::Client,
}

impl Upstreams {
    /// Plain replicas through a pool of its own (as reqwest's: 256 idle
    /// connections per replica, no Nagle, `connect_timeout`); TLS ones
    /// through `tls`.
    pub fn new(tls: reqwest::Client, connect_timeout: Duration) -> Upstreams {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let plain = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(256)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Upstreams { plain, tls }
    }

    /// POSTs a JSON `body` to `target` with `headers`; the replica's answer
    /// once its head has come.
    pub async fn post(
        &self,
        target: Target,
        headers: &[(&'static str, &str)],
        body: Bytes,
    ) -> Result<Upstream, UpstreamError> {
        match target {
            Target::Plain(uri) => {
                let mut req = Request::builder()
                    .method(Method::POST)
                    .uri(uri)
                    .header(header::CONTENT_TYPE, "application/json");
                for (name, value) in headers {
                    req = req.header(*name, HeaderValue::from_str(value)?);
                }
                let answer = self.plain.request(req.body(Full::new(body))?).await?;
                Ok(Upstream {
                    status: answer.status(),
                    body: Answer::Plain(answer.into_body()),
                })
            }
            Target::Tls(url) => {
                let mut post = self
                    .tls
                    .post(url)
                    .header(header::CONTENT_TYPE, "application/json");
                for (name, value) in headers {
                    post = post.header(*name, *value);
                }
                let answer = post.body(body).send().await?;
                Ok(Upstream {
                    status: answer.status(),
                    body: Answer::Tls(answer),
                })
            }
        }
    }
}

/// A replica's answer: its status, and its body still to read.
pub struct Upstream {
    status: StatusCode,
    body: Answer,
}

enum Answer {
    Plain(Incoming),
    Tls(reqwest::Response),
}

impl Upstream {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The whole body.
    pub async fn bytes(self) -> Result<Bytes, UpstreamError> {
        match self.body {
            Answer::Plain(body) => Ok(body.collect().await?.to_bytes()),
            Answer::Tls(answer) => Ok(answer.bytes().await?),
        }
    }

    /// The body as it comes.
    pub fn bytes_stream(self) -> ByteStream {
        match self.body {
            Answer::Plain(body) => BodyDataStream::new(body).map_err(Into::into).boxed(),
            Answer::Tls(answer) => answer.bytes_stream().map_err(Into::into).boxed(),
        }
    }
}

/// `e` and what caused it, as one line: hyper's own message alone is
/// "client error (Connect)".
pub fn describe(e: &UpstreamError) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_goes_to_hyper_and_https_to_the_tls_client() {
        assert!(matches!(
            Target::parse("http://127.0.0.1:8001/v1/chat/completions"),
            Some(Target::Plain(u)) if u.path() == "/v1/chat/completions" && u.port_u16() == Some(8001)
        ));
        assert!(matches!(
            Target::parse("https://replica-0:8443/v1/completions"),
            Some(Target::Tls(u)) if u.path() == "/v1/completions"
        ));
        assert!(Target::parse("not a url/v1/completions").is_none());
    }

    #[tokio::test]
    async fn an_unreachable_replica_says_why() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let upstreams = Upstreams::new(reqwest::Client::new(), Duration::from_secs(1));
        let target = Target::parse(&format!("http://127.0.0.1:{port}/v1/completions")).unwrap();
        let err = match upstreams.post(target, &[], Bytes::new()).await {
            Err(e) => describe(&e),
            Ok(_) => panic!("a closed port answered"),
        };
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }
}
