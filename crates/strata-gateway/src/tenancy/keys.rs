//! API keys made: a tenant's new key (its secret shown once, only its
//! digest kept), and the platform tenant with its first admin key.

use std::path::Path;

use strata_core::store::{KeyStore, TenantStore};
use strata_core::tenant::{
    digest_lookup, key_digest, looks_like_key, ApiKeyRecord, Isolation, NewKey, RateLimits, Role,
    Tenant, TenantId,
};

/// What follows a source's name when it gives something that is not a key.
pub const NOT_A_KEY: &str =
    "does not hold a strata key (sk-strata- followed by 43 base64url characters)";

/// A new key from the OS random source: its secret and digest.
pub fn new_key() -> NewKey {
    let mut random = [0u8; 32];
    getrandom::getrandom(&mut random).expect("the OS random source is available");
    NewKey::from_random(random)
}

/// A new random key for `tenant`, stored as a digest; the secret is returned once.
pub fn new_key_record(tenant: &TenantId, name: String, role: Role) -> (ApiKeyRecord, String) {
    let new = new_key();
    let record = ApiKeyRecord {
        id: format!("key_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
        tenant_id: tenant.clone(),
        name,
        role,
        models: None,
        limits: RateLimits::default(),
        priority: Default::default(),
        expires_at_ms: None,
        revoked_at_ms: None,
        created_at_ms: strata_core::now_ms(),
        digest: new.digest,
    };
    (record, new.secret)
}

/// Where a platform's own admin key comes from, when the operator gives one.
#[derive(Debug, Clone, Copy)]
pub enum AdminKey<'a> {
    /// The key, e.g. from `STRATA_ADMIN_KEY` (on Kubernetes, from the
    /// `strata` Secret: a key the gateway generated would land in the
    /// container log).
    Value(&'a str),
    /// A file holding it (`security.admin_key_file`).
    File(&'a Path),
}

/// Makes sure the platform tenant and a platform admin key exist. With an
/// `admin_key`, that key is an admin key; otherwise, when no active admin
/// key exists, a new one is made and returned to be shown once.
pub async fn bootstrap<S: TenantStore + KeyStore + ?Sized>(
    store: &S,
    admin_key: Option<AdminKey<'_>>,
) -> Result<Option<String>, String> {
    let platform = TenantId::platform();
    if store
        .tenant(&platform)
        .await
        .map_err(|e| e.to_string())?
        .is_none()
    {
        store
            .create_tenant(&Tenant {
                id: platform.clone(),
                name: "platform".into(),
                isolation: Isolation::Shared,
                limits: RateLimits::default(),
                priority: Default::default(),
                monthly_budget_usd: None,
                created_at_ms: strata_core::now_ms(),
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    if let Some(given) = admin_key {
        let (secret, source, name) = match given {
            AdminKey::Value(secret) => (
                secret.to_string(),
                "STRATA_ADMIN_KEY".to_string(),
                "platform admin (from the environment)",
            ),
            AdminKey::File(path) => (
                std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read the admin key file {}: {e}", path.display())
                })?,
                path.display().to_string(),
                "platform admin (from file)",
            ),
        };
        let secret = secret.trim();
        if !looks_like_key(secret) {
            return Err(format!("{source} {NOT_A_KEY}"));
        }
        let digest = key_digest(secret);
        let known = store
            .keys_by_lookup(digest_lookup(&digest))
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .any(|k| k.digest == digest);
        if !known {
            let (mut record, _) = new_key_record(&platform, name.into(), Role::Admin);
            record.digest = digest;
            store.create_key(&record).await.map_err(|e| e.to_string())?;
        }
        return Ok(None);
    }
    let now = strata_core::now_ms();
    let has_admin = store
        .keys(&platform)
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .any(|k| k.role == Role::Admin && k.is_active(now));
    if has_admin {
        return Ok(None);
    }
    let (record, secret) = new_key_record(&platform, "platform admin".into(), Role::Admin);
    store.create_key(&record).await.map_err(|e| e.to_string())?;
    Ok(Some(secret))
}
