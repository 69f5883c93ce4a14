//! Who is calling: the Bearer key becomes a `Principal` (key, role, tenant)
//! before any handler runs. Every kind of bad key gets the same 401.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use strata_core::store::Store;
use strata_core::tenant::{
    digest_lookup, key_digest, looks_like_key, ApiKeyRecord, Isolation, Role, Tenant,
};
use strata_core::ApiError;
use subtle::ConstantTimeEq;

use crate::FastMap;

/// The authenticated caller, in the request's extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    pub key: ApiKeyRecord,
    pub tenant: Tenant,
}

impl Principal {
    pub fn role(&self) -> Role {
        self.key.role
    }

    /// The replica pool the tenant's requests go to: its own (by name) when
    /// it is `dedicated`, else the shared one (`None`).
    pub fn pool(&self) -> Option<&str> {
        (self.tenant.isolation == Isolation::Dedicated).then_some(self.tenant.name.as_str())
    }

    /// An admin of the platform tenant: sees and manages every tenant.
    pub fn is_platform_admin(&self) -> bool {
        self.key.role == Role::Admin && self.tenant.id.is_platform()
    }
}

/// How long a looked-up key is trusted before the store is asked again; a
/// revocation through this gateway takes effect at once, one through another
/// gateway within this time.
const CACHE_TTL: Duration = Duration::from_secs(2);

/// Principals by key digest, with when they were looked up.
type KeyCache = FastMap<[u8; 32], (Arc<Principal>, Instant)>;

pub struct Authenticator {
    store: Arc<dyn Store>,
    cache: Mutex<KeyCache>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn Store>) -> Authenticator {
        Authenticator {
            store,
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
        let now_ms = crate::now_ms();
        if let Some(p) = self.cached(&digest) {
            return if p.key.is_active(now_ms) {
                Ok(p)
            } else {
                Err(ApiError::unauthorized())
            };
        }
        let candidates = self
            .store
            .keys_by_lookup(digest_lookup(&digest))
            .await
            .map_err(crate::admin::store_error)?;
        let key = candidates
            .into_iter()
            .find(|k| bool::from(k.digest.ct_eq(&digest)))
            .ok_or_else(ApiError::unauthorized)?;
        let tenant = self
            .store
            .tenant(&key.tenant_id)
            .await
            .map_err(crate::admin::store_error)?
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
