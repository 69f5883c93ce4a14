//! Who is calling: the Bearer key becomes a `Principal` (key, role, tenant)
//! before any handler runs. Every kind of bad key gets the same 401.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use strata_core::store::{KeyStore, TenantStore};
use strata_core::tenant::{digest_lookup, key_digest, looks_like_key};
use strata_core::ApiError;
use subtle::ConstantTimeEq;

use crate::http::error::store_error;
use crate::tenancy::fairq::Class;
use crate::tenancy::principal::Principal;
use crate::tenancy::FastMap;

/// How long a looked-up key is trusted before the store is asked again; a
/// revocation through this gateway takes effect at once, one through another
/// gateway within this time.
const CACHE_TTL: Duration = Duration::from_secs(2);

/// Principals by key digest, with when they were looked up.
type KeyCache = FastMap<[u8; 32], (Arc<Principal>, Instant)>;

pub struct Authenticator {
    keys: Arc<dyn KeyStore>,
    tenants: Arc<dyn TenantStore>,
    cache: Mutex<KeyCache>,
    refusals: Mutex<Refusals>,
    /// Where refused keys are recorded (bounded), when set.
    audit: Option<crate::tenancy::audit::Audit>,
}

/// Refused keys per client address (a token bucket each), and digests of
/// keys that authenticated lately: while an address is over its refusals,
/// its requests get 429 before any store lookup, except those with a key
/// known to be good (so a proxy's address, shared by many clients, does not
/// lock out the ones with valid keys).
#[derive(Default)]
struct Refusals {
    by_peer: FastMap<std::net::IpAddr, (f64, Instant)>,
    known_good: FastMap<[u8; 32], Instant>,
}

/// Refused keys an address may send at once, and how many more a second.
const REFUSAL_BURST: f64 = 64.0;
const REFUSALS_PER_SEC: f64 = 2.0;
/// How long a key that authenticated stays known to be good.
const KNOWN_GOOD: Duration = Duration::from_secs(600);

/// An address's refusals left now: what its bucket held at `at`, refilled since.
fn refilled((tokens, at): (f64, Instant)) -> f64 {
    (tokens + at.elapsed().as_secs_f64() * REFUSALS_PER_SEC).min(REFUSAL_BURST)
}

impl Authenticator {
    pub fn new(keys: Arc<dyn KeyStore>, tenants: Arc<dyn TenantStore>) -> Authenticator {
        Authenticator {
            keys,
            tenants,
            cache: Mutex::new(KeyCache::default()),
            refusals: Mutex::new(Refusals::default()),
            audit: None,
        }
    }

    /// Records refused keys (at most a few rows a second) in `audit`.
    pub fn with_audit(mut self, audit: crate::tenancy::audit::Audit) -> Authenticator {
        self.audit = Some(audit);
        self
    }

    /// Whether `peer` has used up its refusals and `authorization` is not a
    /// key known to be good: then the request gets 429 without a lookup.
    fn throttled(&self, peer: std::net::IpAddr, authorization: Option<&str>) -> bool {
        let mut r = self.refusals.lock().expect("refusals lock");
        let Some(tokens) = r.by_peer.get(&peer).copied().map(refilled) else {
            return false;
        };
        if tokens >= 1.0 {
            return false;
        }
        let digest = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(|s| key_digest(s.trim()));
        !digest.is_some_and(|d| {
            r.known_good
                .get(&d)
                .is_some_and(|t| t.elapsed() < KNOWN_GOOD)
        }) && {
            r.by_peer.insert(peer, (tokens, Instant::now()));
            true
        }
    }

    /// Counts one refused key from `peer`.
    fn refused(&self, peer: std::net::IpAddr) {
        let mut r = self.refusals.lock().expect("refusals lock");
        if r.by_peer.len() > 100_000 {
            // Many addresses: forget the ones whose buckets are full again.
            r.by_peer
                .retain(|_, bucket| refilled(*bucket) < REFUSAL_BURST);
        }
        let tokens = r
            .by_peer
            .get(&peer)
            .copied()
            .map_or(REFUSAL_BURST, refilled);
        r.by_peer
            .insert(peer, ((tokens - 1.0).max(0.0), Instant::now()));
    }

    /// The principal for `Authorization: Bearer <key>`, or the one 401.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Arc<Principal>, ApiError> {
        let secret = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| looks_like_key(s))
            .ok_or_else(ApiError::unauthorized)?;
        let digest = key_digest(secret);
        let now_ms = strata_core::now_ms();
        if let Some(p) = self.cached(&digest) {
            return if p.key.is_active(now_ms) {
                Ok(p)
            } else {
                Err(ApiError::unauthorized())
            };
        }
        let candidates = self
            .keys
            .keys_by_lookup(digest_lookup(&digest))
            .await
            .map_err(store_error)?;
        let key = candidates
            .into_iter()
            .find(|k| bool::from(k.digest.ct_eq(&digest)))
            .ok_or_else(ApiError::unauthorized)?;
        let tenant = self
            .tenants
            .tenant(&key.tenant_id)
            .await
            .map_err(store_error)?
            .ok_or_else(ApiError::unauthorized)?;
        let principal = Arc::new(Principal {
            class: Class::of(key.priority, tenant.priority),
            key,
            tenant,
        });
        self.refusals
            .lock()
            .expect("refusals lock")
            .known_good
            .insert(digest, Instant::now());
        self.cache
            .lock()
            .expect("auth cache lock")
            .insert(digest, (principal.clone(), Instant::now()));
        if !principal.key.is_active(now_ms) {
            return Err(ApiError::unauthorized());
        }
        Ok(principal)
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Arc<Principal>> {
        let mut cache = self.cache.lock().expect("auth cache lock");
        match cache.get(digest) {
            Some((p, at)) if at.elapsed() < CACHE_TTL => Some(p.clone()),
            Some(_) => {
                cache.remove(digest);
                None
            }
            None => None,
        }
    }

    /// Drops cached principals of one tenant (after a change to it or its keys).
    pub fn forget_tenant(&self, tenant: &str) {
        self.cache
            .lock()
            .expect("auth cache lock")
            .retain(|_, (p, _)| p.tenant.id.as_str() != tenant);
    }
}

/// Layer: authenticates every request it wraps and stores the `Principal`.
pub async fn require_key(
    State(auth): State<Arc<Authenticator>>,
    mut req: Request,
    next: Next,
) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let peer = req
        .extensions()
        .get::<strata_core::tls::Peer>()
        .map(|p| p.0.ip());
    if peer.is_some_and(|ip| auth.throttled(ip, header)) {
        return ApiError::rate_limited(
            "Too many requests with keys that are not valid from this address.",
            1,
        )
        .into_response();
    }
    match auth.authenticate(header).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        // A store that is away is not a refused key.
        Err(e) if e.status != 401 => e.into_response(),
        Err(e) => {
            if let Some(ip) = peer {
                auth.refused(ip);
            }
            if let Some(audit) = &auth.audit {
                let from = peer.map_or_else(|| "-".to_owned(), |ip| ip.to_string());
                audit
                    .record_anonymous(
                        "auth",
                        &format!("{} from {from}", req.uri().path()),
                        "invalid_key",
                    )
                    .await;
            }
            e.into_response()
        }
    }
}
