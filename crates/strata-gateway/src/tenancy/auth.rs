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
}

impl Authenticator {
    pub fn new(keys: Arc<dyn KeyStore>, tenants: Arc<dyn TenantStore>) -> Authenticator {
        Authenticator {
            keys,
            tenants,
            cache: Mutex::new(KeyCache::default()),
        }
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
        let principal = Arc::new(Principal { key, tenant });
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
    match auth.authenticate(header).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}
