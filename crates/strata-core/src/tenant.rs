//! Tenants, their API keys and roles, and the audit trail's rows: what the
//! gateway's auth, limits and admin API work with.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The tenant that owns the platform admin key; it cannot be deleted and its
/// admins manage every tenant.
pub const PLATFORM_TENANT: &str = "ten_platform";
/// Every API key starts with this, then 43 base64url characters (32 bytes).
pub const KEY_PREFIX: &str = "sk-strata-";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub String);

impl TenantId {
    pub fn new() -> TenantId {
        TenantId(format!("ten_{}", uuid::Uuid::new_v4().simple()))
    }

    pub fn platform() -> TenantId {
        TenantId(PLATFORM_TENANT.to_owned())
    }

    pub fn is_platform(&self) -> bool {
        self.0 == PLATFORM_TENANT
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TenantId {
    fn default() -> Self {
        TenantId::new()
    }
}

impl std::fmt::Display for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// Manages its own tenant's keys and settings (every tenant, on the platform tenant).
    Admin,
    /// Calls the model APIs.
    Member,
    /// Reads its tenant's usage and objects; creates nothing.
    Reader,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
            Role::Reader => "reader",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "admin" => Role::Admin,
            "member" => Role::Member,
            "reader" => Role::Reader,
            _ => return None,
        })
    }

    /// Admins and members may generate; readers only read.
    pub fn may_generate(self) -> bool {
        matches!(self, Role::Admin | Role::Member)
    }
}

/// `shared` tenants use the common replicas; `dedicated` ones only replicas reserved for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Isolation {
    #[default]
    Shared,
    Dedicated,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Shared => "shared",
            Isolation::Dedicated => "dedicated",
        }
    }

    pub fn parse(s: &str) -> Option<Isolation> {
        Some(match s {
            "shared" => Isolation::Shared,
            "dedicated" => Isolation::Dedicated,
            _ => return None,
        })
    }
}

/// How a tenant's or a key's requests stand when the replicas are full:
/// `interactive` ones wait their fair turn; `sheddable` ones are refused
/// at once (503 with `Retry-After`) rather than wait, and never take the
/// last free slot, so that others' interactive requests do not wait
/// behind them. A key is sheddable where it or its tenant is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Priority {
    #[default]
    Interactive,
    Sheddable,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Sheddable => "sheddable",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Some(match s {
            "interactive" => Priority::Interactive,
            "sheddable" => Priority::Sheddable,
            _ => return None,
        })
    }
}

/// Per-minute limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Tokens per minute of batch lines, counted apart from interactive
    /// requests (a batch then never uses up its tenant's interactive
    /// allowance). Unset: batch lines count against the interactive limits.
    #[serde(default)]
    pub batch_tokens_per_minute: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub isolation: Isolation,
    pub limits: RateLimits,
    /// Dollars per calendar month (UTC); `None` means no budget.
    pub monthly_budget_usd: Option<f64>,
    pub priority: Priority,
    pub created_at_ms: i64,
}

/// A stored API key: never the key itself, only its digest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub tenant_id: TenantId,
    pub name: String,
    pub role: Role,
    /// Models this key may use; `None` means all.
    pub models: Option<Vec<String>>,
    pub limits: RateLimits,
    pub priority: Priority,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    pub created_at_ms: i64,
    #[serde(skip)]
    pub digest: [u8; 32],
}

impl ApiKeyRecord {
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| now_ms < e)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

/// A key's secret as shown once, and the digest that is stored.
pub struct NewKey {
    pub secret: String,
    pub digest: [u8; 32],
}

impl NewKey {
    /// `random` must be 32 bytes from a CSPRNG.
    pub fn from_random(random: [u8; 32]) -> NewKey {
        let secret = format!("{KEY_PREFIX}{}", base64url(&random));
        let digest = key_digest(&secret);
        NewKey { secret, digest }
    }
}

pub fn key_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The indexed part of a digest: the store finds candidates by it, and the
/// caller compares the full digest in constant time.
pub fn digest_lookup(digest: &[u8; 32]) -> i64 {
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Whether `secret` has the shape of a strata key; anything else is refused
/// before touching the store.
pub fn looks_like_key(secret: &str) -> bool {
    secret.len() == KEY_PREFIX.len() + 43
        && secret.starts_with(KEY_PREFIX)
        && secret[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 2);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// One audit row before the store chains it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub at_ms: i64,
    /// Key id of the caller (`-` for the system itself).
    pub actor_key: String,
    pub actor_tenant: String,
    /// `tenant.create`, `key.revoke`, `completion.read`, ...
    pub action: String,
    /// Tenant whose object was touched.
    pub tenant: String,
    /// Object id (tenant, key, stored object), or empty.
    pub target: String,
    /// `ok`, `denied`, `not_found`, ...
    pub result: String,
}

/// An audit row as stored: its place in the chain and the hashes that bind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    pub seq: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    pub prev_hash: String,
    pub hash: String,
}

/// The key the audit chain and its checkpoints are keyed with: 32 bytes
/// kept apart from the database (like the KEK), so whoever can write the
/// database cannot recompute the chain over rows they changed.
#[derive(Clone)]
pub struct AuditKey([u8; 32]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    pub fn from_bytes(bytes: [u8; 32]) -> AuditKey {
        AuditKey(bytes)
    }

    fn mac(&self) -> hmac::Hmac<Sha256> {
        use hmac::Mac;
        hmac::Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }
}

/// Every row's hash starts with this (the scheme: HMAC-SHA256 under the
/// audit key); trails written before strata keyed them fail verification.
pub const KEYED: &str = "k1:";

/// Feeds every field of a row, length-prefixed, after its place and the
/// hash before it.
fn row_bytes(update: &mut dyn FnMut(&[u8]), seq: i64, prev_hash: &str, e: &AuditEntry) {
    update(&seq.to_be_bytes());
    update(&e.at_ms.to_be_bytes());
    for part in [
        prev_hash,
        &e.actor_key,
        &e.actor_tenant,
        &e.action,
        &e.tenant,
        &e.target,
        &e.result,
    ] {
        update(&(part.len() as u64).to_be_bytes());
        update(part.as_bytes());
    }
}

/// The hash a row is chained with: HMAC-SHA256 under the audit key over
/// its place, the previous hash and every field (`k1:` and hex).
pub fn audit_hash(key: &AuditKey, seq: i64, prev_hash: &str, e: &AuditEntry) -> String {
    use hmac::Mac;
    let mut mac = key.mac();
    row_bytes(&mut |b| mac.update(b), seq, prev_hash, e);
    format!("{KEYED}{}", hex_lower(&mac.finalize().into_bytes()))
}

/// The hash that precedes the first row.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditBreak {
    pub seq: i64,
    pub reason: String,
}

/// Checks that rows run 1, 2, 3... and each is keyed to the one before; an
/// edited, deleted or inserted row breaks it, and so does a chain
/// recomputed without the key. Truncation of the newest rows shows only
/// against a checkpoint kept elsewhere ([`verify_checkpoints`]).
pub fn verify_audit(rows: &[AuditRecord], key: &AuditKey) -> Result<(), AuditBreak> {
    let mut prev = AUDIT_GENESIS.to_owned();
    for (i, row) in rows.iter().enumerate() {
        let expected_seq = i as i64 + 1;
        if row.seq != expected_seq {
            return Err(AuditBreak {
                seq: expected_seq,
                reason: format!("row {expected_seq} is missing (found {})", row.seq),
            });
        }
        if row.prev_hash != prev {
            return Err(AuditBreak {
                seq: row.seq,
                reason: "previous-hash link does not match the row before".into(),
            });
        }
        if audit_hash(key, row.seq, &row.prev_hash, &row.entry) != row.hash {
            return Err(AuditBreak {
                seq: row.seq,
                reason: "row content does not match its hash under the audit key (edited, or \
                         chained with another key)"
                    .into(),
            });
        }
        prev = row.hash.clone();
    }
    Ok(())
}

/// The trail's head as seen at one moment, keyed so that whoever holds the
/// database alone cannot make one: kept outside the database (a file, the
/// log), it shows rows dropped from the end and rows rewritten before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCheckpoint {
    pub seq: i64,
    pub hash: String,
    pub at_ms: i64,
    pub mac: String,
}

impl AuditCheckpoint {
    pub fn new(key: &AuditKey, seq: i64, hash: &str, at_ms: i64) -> AuditCheckpoint {
        AuditCheckpoint {
            seq,
            hash: hash.to_owned(),
            at_ms,
            mac: checkpoint_mac(key, seq, hash, at_ms),
        }
    }
}

fn checkpoint_mac(key: &AuditKey, seq: i64, hash: &str, at_ms: i64) -> String {
    use hmac::Mac;
    let mut mac = key.mac();
    mac.update(b"strata audit checkpoint");
    mac.update(&seq.to_be_bytes());
    mac.update(&at_ms.to_be_bytes());
    mac.update(hash.as_bytes());
    hex_lower(&mac.finalize().into_bytes())
}

/// Checks the trail against checkpoints: each must carry a good MAC, and
/// the trail must still hold the row it names with the hash it names.
pub fn verify_checkpoints(
    rows: &[AuditRecord],
    checkpoints: &[AuditCheckpoint],
    key: &AuditKey,
) -> Result<(), AuditBreak> {
    for c in checkpoints {
        if checkpoint_mac(key, c.seq, &c.hash, c.at_ms) != c.mac {
            return Err(AuditBreak {
                seq: c.seq,
                reason: format!(
                    "the checkpoint of {} is not keyed with the audit key (forged)",
                    c.at_ms
                ),
            });
        }
        let Some(row) = usize::try_from(c.seq - 1).ok().and_then(|i| rows.get(i)) else {
            return Err(AuditBreak {
                seq: c.seq,
                reason: format!(
                    "the trail ends at row {} but a checkpoint saw row {} (rows dropped from the end)",
                    rows.len(),
                    c.seq
                ),
            });
        };
        if row.hash != c.hash {
            return Err(AuditBreak {
                seq: c.seq,
                reason: "row differs from what a checkpoint saw (rewritten)".into(),
            });
        }
    }
    Ok(())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> AuditKey {
        AuditKey::from_bytes([9; 32])
    }

    fn chain(n: usize) -> Vec<AuditRecord> {
        let mut prev = AUDIT_GENESIS.to_owned();
        (1..=n as i64)
            .map(|seq| {
                let entry = AuditEntry {
                    at_ms: seq * 10,
                    actor_key: "key_1".into(),
                    actor_tenant: "ten_a".into(),
                    action: "tenant.create".into(),
                    tenant: "ten_a".into(),
                    target: format!("obj{seq}"),
                    result: "ok".into(),
                };
                let hash = audit_hash(&key(), seq, &prev, &entry);
                let row = AuditRecord {
                    seq,
                    entry,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                row
            })
            .collect()
    }

    #[test]
    fn keys_have_the_documented_shape_and_distinct_digests() {
        let a = NewKey::from_random([7; 32]);
        let b = NewKey::from_random([8; 32]);
        assert!(looks_like_key(&a.secret), "{}", a.secret);
        assert_eq!(a.secret.len(), KEY_PREFIX.len() + 43);
        assert_ne!(a.digest, b.digest);
        assert_eq!(key_digest(&a.secret), a.digest);
        assert!(!looks_like_key("sk-strata-short"));
        let mut outside_alphabet = a.secret.clone();
        outside_alphabet.pop();
        outside_alphabet.push('+');
        assert!(!looks_like_key(&outside_alphabet));
    }

    #[test]
    fn expiry_revocation_and_allow_list() {
        let mut k = ApiKeyRecord {
            id: "key_1".into(),
            tenant_id: TenantId("ten_a".into()),
            name: "k".into(),
            role: Role::Member,
            models: Some(vec!["m1".into()]),
            limits: RateLimits::default(),
            priority: Default::default(),
            expires_at_ms: Some(100),
            revoked_at_ms: None,
            created_at_ms: 0,
            digest: [0; 32],
        };
        assert!(k.is_active(99));
        assert!(!k.is_active(100));
        assert!(k.allows_model("m1") && !k.allows_model("m2"));
        k.expires_at_ms = None;
        k.revoked_at_ms = Some(5);
        assert!(!k.is_active(0));
    }

    proptest! {
        #[test]
        fn any_single_edit_or_deletion_breaks_the_chain(n in 2usize..30, pick in 0usize..30, kind in 0u8..4) {
            let mut rows = chain(n);
            prop_assert!(verify_audit(&rows, &key()).is_ok());
            // Removing the newest row is truncation, which only a recorded head shows.
            let i = if kind == 2 { pick % (n - 1) } else { pick % n };
            match kind {
                0 => rows[i].entry.result = "denied".into(),
                1 => rows[i].entry.at_ms += 1,
                2 => { rows.remove(i); }
                _ => rows.swap(i, (i + 1) % n),
            }
            prop_assert!(verify_audit(&rows, &key()).is_err());
        }

        #[test]
        fn a_chain_recomputed_without_the_key_or_cut_short_is_caught(n in 2usize..30, pick in 0usize..30) {
            let rows = chain(n);
            let checkpoint = AuditCheckpoint::new(&key(), n as i64, &rows[n - 1].hash, 7);
            prop_assert!(verify_checkpoints(&rows, std::slice::from_ref(&checkpoint), &key()).is_ok());
            // An insider edits a row and chains everything after it again,
            // with another key (they do not hold this one) or with SHA-256.
            let i = pick % n;
            for other in [Some(AuditKey::from_bytes([1; 32])), None] {
                let mut forged = rows.clone();
                forged[i].entry.result = "ok".into();
                forged[i].entry.target = "nothing to see".into();
                let mut prev = forged[i].prev_hash.clone();
                for row in &mut forged[i..] {
                    row.prev_hash = prev.clone();
                    row.hash = match &other {
                        Some(k) => audit_hash(k, row.seq, &prev, &row.entry),
                        // Plain SHA-256 of the same bytes, as the trail was
                        // chained before it had a key.
                        None => {
                            let mut h = Sha256::new();
                            row_bytes(&mut |b| h.update(b), row.seq, &prev, &row.entry);
                            hex_lower(&h.finalize())
                        }
                    };
                    prev = row.hash.clone();
                }
                prop_assert!(verify_audit(&forged, &key()).is_err());
                prop_assert!(verify_checkpoints(&forged, std::slice::from_ref(&checkpoint), &key()).is_err());
            }
            // The newest rows dropped: the chain alone cannot tell, the checkpoint can.
            let cut = &rows[..i];
            prop_assert!(verify_audit(cut, &key()).is_ok());
            prop_assert!(verify_checkpoints(cut, std::slice::from_ref(&checkpoint), &key()).is_err());
            // A checkpoint made up without the key.
            let mut made_up = checkpoint.clone();
            made_up.seq = i as i64;
            prop_assert!(verify_checkpoints(&rows, &[made_up], &key()).is_err());
        }

        #[test]
        fn base64url_keys_are_always_well_formed(bytes in proptest::array::uniform32(any::<u8>())) {
            prop_assert!(looks_like_key(&NewKey::from_random(bytes).secret));
        }
    }
}
