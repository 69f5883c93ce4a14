//! How requests reach a replica, and how the gateway proves itself to it.
//! Generation requests go through hyper's pooled HTTP/1 client directly,
//! over plain HTTP or mutual TLS (hyper-rustls with strata's replica CA and
//! the gateway's client certificate); probes and snapshots through reqwest
//! with the same TLS settings. reqwest parses the replica's URL twice per
//! request (for its redirect layer and for its response) even with
//! redirects off: about a fifth of a proxied request's instructions
//! (bench/results/peers.md). Every request carries the replica token when
//! there is one.

use std::pin::Pin;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use strata_core::tls;

pub type UpstreamError = Box<dyn std::error::Error + Send + Sync>;
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// How the gateway proves to its replicas that it is their gateway: its
/// client certificate from strata's replica CA (which also checks the
/// replica), and/or the replica token sent as `Authorization: Bearer`.
#[derive(Debug, Clone, Default)]
pub struct ReplicaAuth {
    pub pki: Option<tls::ReplicaPki>,
    pub token: Option<String>,
}

impl ReplicaAuth {
    /// The token as a header value, if there is one.
    fn bearer(&self) -> Result<Option<HeaderValue>, tls::TlsError> {
        self.token
            .as_deref()
            .map(|t| {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                    .map_err(|_| tls::TlsError::Config("the replica token is not ASCII".into()))?;
                v.set_sensitive(true);
                Ok(v)
            })
            .transpose()
    }
}

/// An HTTP client for replicas' probes and snapshots: with a certificate,
/// it trusts only strata's replica CA and presents the gateway's; with a
/// token, it sends it on every request.
pub fn replica_client(
    auth: &ReplicaAuth,
    connect_timeout: Duration,
) -> Result<reqwest::Client, tls::TlsError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        // A replica never redirects; no redirect layer on every request.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(bearer) = auth.bearer()? {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, bearer);
        builder = builder.default_headers(headers);
    }
    if let Some(pki) = &auth.pki {
        builder = builder.use_preconfigured_tls(pki.client_config()?);
    }
    builder
        .build()
        .map_err(|e| tls::TlsError::Config(e.to_string()))
}

/// Where a request for one route of one replica goes.
#[derive(Clone, Debug)]
pub struct Target(Uri);

impl Target {
    /// `url` as a target; `None` if it does not parse or is not HTTP(S).
    pub fn parse(url: &str) -> Option<Target> {
        let uri: Uri = url.parse().ok()?;
        matches!(uri.scheme_str(), Some("http" | "https")).then_some(Target(uri))
    }
}

/// The pooled clients generation requests go through.
#[derive(Clone)]
pub struct Upstreams {
    plain: Client<HttpConnector, Full<Bytes>>,
    /// For `https://` replicas: only with the replica certificates.
    tls: Option<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>,
    bearer: Option<HeaderValue>,
}

impl Upstreams {
    /// Pools like reqwest's (256 idle connections per replica, no Nagle,
    /// `connect_timeout`), one for plain replicas and, with `auth.pki`, one
    /// for mutual-TLS ones.
    pub fn new(auth: &ReplicaAuth, connect_timeout: Duration) -> Result<Upstreams, tls::TlsError> {
        let connector = || {
            let mut c = HttpConnector::new();
            c.set_nodelay(true);
            c.set_connect_timeout(Some(connect_timeout));
            c
        };
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_max_idle_per_host(256).pool_timer(TokioTimer::new());
            b
        };
        let tls = match &auth.pki {
            Some(pki) => {
                let mut http = connector();
                http.enforce_http(false);
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(pki.client_config()?)
                    .https_only()
                    .enable_http1()
                    .wrap_connector(http);
                // One buffer per request, so one TLS record: with vectored
                // writes, head and body went out as a record each.
                let mut b = builder();
                b.http1_writev(false);
                Some(b.build(https))
            }
            None => None,
        };
        Ok(Upstreams {
            plain: builder().build(connector()),
            tls,
            bearer: auth.bearer()?,
        })
    }

    /// POSTs a JSON `body` to `target` with `headers`; the replica's answer
    /// once its head has come.
    pub async fn post(
        &self,
        Target(uri): Target,
        headers: &[(&'static str, &str)],
        body: Bytes,
    ) -> Result<Upstream, UpstreamError> {
        let https = uri.scheme_str() == Some("https");
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json");
        // A replica of another server gets its own key (in `headers`),
        // never strata's replica token.
        let own_key = headers.iter().any(|(name, _)| *name == "authorization");
        if let Some(bearer) = self.bearer.as_ref().filter(|_| !own_key) {
            req = req.header(header::AUTHORIZATION, bearer.clone());
        }
        for (name, value) in headers {
            let mut value = HeaderValue::from_str(value)?;
            value.set_sensitive(*name == "authorization");
            req = req.header(*name, value);
        }
        let req = req.body(Full::new(body))?;
        let answer = match (&self.tls, https) {
            (_, false) => self.plain.request(req).await?,
            (Some(tls), true) => tls.request(req).await?,
            (None, true) => {
                return Err("an https:// replica, and no replica certificates to reach it".into())
            }
        };
        Ok(Upstream {
            status: answer.status(),
            body: answer.into_body(),
        })
    }
}

/// A replica's answer: its status, and its body still to read.
pub struct Upstream {
    status: StatusCode,
    body: Incoming,
}

impl Upstream {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The whole body.
    pub async fn bytes(self) -> Result<Bytes, UpstreamError> {
        Ok(self.body.collect().await?.to_bytes())
    }

    /// The body as it comes.
    pub fn bytes_stream(self) -> ByteStream {
        BodyDataStream::new(self.body).map_err(Into::into).boxed()
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
    fn targets_are_http_or_https_urls() {
        assert!(matches!(
            Target::parse("http://127.0.0.1:8001/v1/chat/completions"),
            Some(Target(u)) if u.path() == "/v1/chat/completions" && u.port_u16() == Some(8001)
        ));
        assert!(matches!(
            Target::parse("https://replica-0:8443/v1/completions"),
            Some(Target(u)) if u.path() == "/v1/completions"
        ));
        assert!(Target::parse("not a url/v1/completions").is_none());
        assert!(Target::parse("ftp://replica-0/v1/completions").is_none());
    }

    #[tokio::test]
    async fn an_unreachable_replica_says_why() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let upstreams = Upstreams::new(&ReplicaAuth::default(), Duration::from_secs(1)).unwrap();
        let target = Target::parse(&format!("http://127.0.0.1:{port}/v1/completions")).unwrap();
        let err = match upstreams.post(target, &[], Bytes::new()).await {
            Err(e) => describe(&e),
            Ok(_) => panic!("a closed port answered"),
        };
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }
}
