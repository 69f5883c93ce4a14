//! Envelope encryption of tenant content. A key-encryption key (KEK) wraps one
//! random 256-bit data key per tenant; content is sealed with AES-256-GCM under
//! the tenant's data key, with associated data naming tenant, table and row so
//! a ciphertext moved anywhere else fails to open.
//!
//! On one machine the wrapped data keys live in a keyring file beside the
//! KEK, not in the database: a database backup holds no keys, so deleting a
//! tenant's data key (crypto-shredding) also makes that tenant's rows in old
//! backups unreadable. Where several gateways share one PostgreSQL, the
//! wrapped keys live in its `data_keys` table (the KEK stays outside, with
//! each gateway), every gateway reserves encryptions there by one atomic
//! UPDATE, and each reads a tenant's keys again at least every
//! `SHARED_REFRESH` (new versions, shredding elsewhere).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, KeyInit, Nonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::AnyPool;
use zeroize::Zeroizing;

mod error;
mod shared;
mod wrapped;

pub use error::VaultError;
use wrapped::{SharedRow, WrappedKey};

/// Encryptions under one data key before a new key version takes over; far
/// below the 2^32 random-nonce bound of AES-GCM.
pub const ROTATE_AFTER: u64 = 1 << 30;
/// Encryptions reserved in the keyring file at a time, so the count survives a
/// restart without a write per seal (a restart skips the unused rest).
const RESERVE_STEP: u64 = 1 << 16;
/// How long a gateway of a shared keyring trusts its copy of a tenant's keys.
pub const SHARED_REFRESH: Duration = Duration::from_secs(30);
const SEALED_MAGIC: &[u8; 2] = b"S1";
/// The keyring entry whose data key keys the audit chain: not a tenant, so
/// no shred destroys it.
pub const AUDIT_KEY_OWNER: &str = "strata:audit";
const NONCE_LEN: usize = 12;

/// A 256-bit key-encryption key and its public id (a digest prefix).
pub struct Kek {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

/// Where the KEK came from, so rotation knows whether it can write a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KekSource {
    File(PathBuf),
    Environment,
}

impl Kek {
    pub fn generate() -> Kek {
        Kek::from_bytes(Aes256Gcm::generate_key(OsRng).into())
    }

    fn from_bytes(bytes: [u8; 32]) -> Kek {
        let id = hex::encode(&Sha256::digest(bytes)[..8]);
        Kek {
            key: Zeroizing::new(bytes),
            id,
        }
    }

    /// 64 hex characters, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Kek, VaultError> {
        let bytes = Zeroizing::new(
            hex::decode(text.trim())
                .map_err(|_| VaultError::Kek("expected 64 hex characters".into()))?,
        );
        let array: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Kek("expected 64 hex characters (32 bytes)".into()))?;
        Ok(Kek::from_bytes(array))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The KEK an interrupted rotation left in `<file>.new`, if any; when the
    /// keyring refuses the KEK in `file`, this one may open it.
    pub fn pending_rotation(file: &Path) -> Option<(Kek, PathBuf)> {
        let pending = pending_path(file);
        let text = std::fs::read_to_string(&pending).ok()?;
        Some((Kek::from_hex(&text).ok()?, pending))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(self.key.as_slice()))
    }

    /// Writes the key as hex to `path` with mode 0600, atomically.
    pub fn write_to(&self, path: &Path) -> Result<(), VaultError> {
        write_private(path, hex::encode(self.key.as_slice()).as_bytes())
            .map_err(|e| VaultError::Kek(format!("cannot write {}: {e}", path.display())))
    }

    /// Reads the KEK from `STRATA_KEK` (hex) if set, else from `file`; with
    /// neither, generates one into `default_file`. The bool says it was generated.
    pub fn load(
        env_value: Option<&str>,
        file: Option<&Path>,
        default_file: &Path,
    ) -> Result<(Kek, KekSource, bool), VaultError> {
        if let Some(text) = env_value {
            return Ok((Kek::from_hex(text)?, KekSource::Environment, false));
        }
        let path = file.unwrap_or(default_file);
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((
                Kek::from_hex(&text)
                    .map_err(|e| VaultError::Kek(format!("{}: {e}", path.display())))?,
                KekSource::File(path.to_owned()),
                false,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.is_none() => {
                let kek = Kek::generate();
                kek.write_to(path)?;
                Ok((kek, KekSource::File(path.to_owned()), true))
            }
            Err(e) => Err(VaultError::Kek(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }
}

/// What a sealed value is bound to: opening it anywhere else fails.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub tenant: &'a str,
    pub table: &'a str,
    pub row: &'a str,
}

impl Binding<'_> {
    fn aad(&self) -> Vec<u8> {
        // Lengths first, so ("ab","c") and ("a","bc") differ.
        let mut aad = Vec::new();
        for part in [self.tenant, self.table, self.row] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct KeyringFile {
    kek_id: String,
    tenants: BTreeMap<String, Vec<WrappedKey>>,
}

struct DataKey {
    version: u32,
    cipher: Aes256Gcm,
    /// A MAC key derived from the data key (HMAC-SHA256 of a label), for
    /// what must be keyed but not sealed: the audit chain.
    mac: Zeroizing<[u8; 32]>,
    /// Encryptions counted so far, and how far this process may count
    /// before it reserves more (in the keyring file or the shared table).
    used: u64,
    limit: u64,
}

/// One tenant's unwrapped keys, newest version last.
struct TenantKeys {
    keys: Vec<DataKey>,
    loaded_at: Instant,
    /// A sealed value named a version this process has not seen: another
    /// gateway added it, so the next use reloads.
    stale: bool,
}

impl TenantKeys {
    /// Keys read (or made) just now.
    fn fresh(keys: Vec<DataKey>) -> TenantKeys {
        TenantKeys {
            keys,
            loaded_at: Instant::now(),
            stale: false,
        }
    }
}

struct Ring {
    kek: Kek,
    source: KekSource,
    /// The keyring file's content (file backing only).
    file: KeyringFile,
    open: BTreeMap<String, TenantKeys>,
}

/// What `Ring::try_seal` needs before it can seal.
enum Need {
    /// The newest key made its share of encryptions: add this version.
    Version(u32),
    /// The newest key's reservation is used up.
    Reservation(u32),
}

impl Ring {
    /// The tenant's newest key version here (0: none).
    fn newest(&self, tenant: &str) -> u32 {
        self.open
            .get(tenant)
            .and_then(|t| t.keys.last())
            .map_or(0, |k| k.version)
    }

    fn try_seal(
        &mut self,
        at: Binding<'_>,
        plaintext: &[u8],
        rotate_after: u64,
    ) -> Result<Result<Vec<u8>, Need>, VaultError> {
        let tenant = self
            .open
            .get_mut(at.tenant)
            .ok_or_else(|| VaultError::NoDataKey(at.tenant.to_owned()))?;
        let key = tenant
            .keys
            .last_mut()
            .expect("a tenant's key list is never empty");
        if key.used >= rotate_after {
            return Ok(Err(Need::Version(key.version + 1)));
        }
        if key.used >= key.limit {
            return Ok(Err(Need::Reservation(key.version)));
        }
        key.used += 1;
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let sealed = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &at.aad(),
                },
            )
            .map_err(|_| VaultError::Open)?;
        let mut out = Vec::with_capacity(2 + 4 + NONCE_LEN + sealed.len());
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&key.version.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(Ok(out))
    }

    fn open_sealed(&mut self, at: Binding<'_>, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if sealed.len() < 2 + 4 + NONCE_LEN || &sealed[..2] != SEALED_MAGIC {
            return Err(VaultError::Open);
        }
        let version = u32::from_be_bytes(sealed[2..6].try_into().expect("4 bytes"));
        let nonce = Nonce::from_slice(&sealed[6..6 + NONCE_LEN]);
        let tenant = self.open.get_mut(at.tenant).ok_or(VaultError::Open)?;
        let Some(key) = tenant.keys.iter().find(|k| k.version == version) else {
            tenant.stale |= tenant.keys.last().is_some_and(|k| k.version < version);
            return Err(VaultError::Open);
        };
        key.cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[6 + NONCE_LEN..],
                    aad: &at.aad(),
                },
            )
            .map_err(|_| VaultError::Open)
    }

    /// Replaces the tenant's keys with `rows` (what the shared table holds),
    /// keeping the counts of versions already open; no rows: the tenant's
    /// keys are gone.
    fn install(&mut self, tenant: &str, rows: Vec<SharedRow>) -> Result<(), VaultError> {
        let old = self.open.remove(tenant);
        if rows.is_empty() {
            return Ok(());
        }
        let mut old_keys: BTreeMap<u32, DataKey> = old
            .map(|t| t.keys.into_iter().map(|k| (k.version, k)).collect())
            .unwrap_or_default();
        let mut keys = Vec::new();
        for row in rows {
            if let Some(key) = old_keys.remove(&row.key.version) {
                keys.push(key);
                continue;
            }
            if row.kek_id != self.kek.id() {
                return Err(VaultError::Kek(format!(
                    "the data key of {tenant} is wrapped under KEK {}, but this process holds {}; \
                     restart it with the current KEK",
                    row.kek_id,
                    self.kek.id()
                )));
            }
            let raw = unwrap_bytes(&self.kek, tenant, &row.key).map_err(|_| {
                VaultError::Kek(format!(
                    "the data key of {tenant} does not open under this KEK"
                ))
            })?;
            // A reservation comes first: the shared count says where this
            // process starts.
            keys.push(DataKey::new(row.key.version, &raw, 0));
        }
        keys.sort_by_key(|k| k.version);
        self.open.insert(tenant.to_owned(), TenantKeys::fresh(keys));
        Ok(())
    }
}

/// Where the wrapped keys live.
enum Backing {
    /// A keyring file beside the KEK (one machine).
    File(PathBuf),
    /// The `data_keys` table of a PostgreSQL database shared by every
    /// gateway of a cluster.
    Shared(AnyPool),
}

/// The KEK, the wrapped data keys and the unwrapped ones in memory.
pub struct Vault {
    backing: Backing,
    rotate_after: u64,
    /// How long a shared-keyring process trusts its copy of a tenant's keys
    /// before it reads them again (other gateways add versions and shred).
    refresh: Duration,
    ring: Mutex<Ring>,
}

impl Vault {
    /// Opens (or creates) the keyring at `path`; every wrapped key must open
    /// under `kek`, else the wrong KEK was given and nothing starts.
    pub fn open(path: &Path, kek: Kek, source: KekSource) -> Result<Vault, VaultError> {
        let keyring_err = |message: String| VaultError::Keyring {
            path: path.to_owned(),
            message,
        };
        let file = read_keyring(path, &kek)?;
        let mut ring = Ring {
            kek,
            source,
            file,
            open: BTreeMap::new(),
        };
        for (tenant, versions) in &ring.file.tenants {
            let mut keys = Vec::new();
            for w in versions {
                let raw = unwrap_bytes(&ring.kek, tenant, w).map_err(|_| {
                    keyring_err(format!("data key of {tenant} does not open under this KEK"))
                })?;
                // Whatever was reserved may have been used before a restart.
                keys.push(DataKey::new(w.version, &raw, w.reserved));
            }
            ring.open.insert(tenant.clone(), TenantKeys::fresh(keys));
        }
        let vault = Vault {
            backing: Backing::File(path.to_owned()),
            rotate_after: ROTATE_AFTER,
            refresh: SHARED_REFRESH,
            ring: Mutex::new(ring),
        };
        vault.save(&vault.lock())?;
        Ok(vault)
    }

    /// Opens the keyring kept in the database behind `pool` (PostgreSQL,
    /// migrated), shared by every gateway that connects to it. Every wrapped
    /// key must open under `kek`. A keyring file at `import` (from a
    /// single-machine start on this database) is copied in first and
    /// renamed to `<file>.imported`.
    pub async fn open_shared(
        pool: AnyPool,
        kek: Kek,
        source: KekSource,
        import: Option<&Path>,
    ) -> Result<Vault, VaultError> {
        if let Some(path) = import.filter(|p| p.exists()) {
            let file = read_keyring(path, &kek)?;
            for (tenant, versions) in &file.tenants {
                for w in versions {
                    shared::insert(&pool, tenant, kek.id(), w).await?;
                }
            }
            let mut done = path.as_os_str().to_owned();
            done.push(".imported");
            std::fs::rename(path, &done).map_err(|e| VaultError::Keyring {
                path: path.to_owned(),
                message: format!("imported, but cannot rename: {e}"),
            })?;
            tracing::info!(file = %path.display(), tenants = file.tenants.len(), "keyring file imported into the database");
        }
        let rows = shared::all(&pool).await?;
        let mut ring = Ring {
            kek,
            source,
            file: KeyringFile::default(),
            open: BTreeMap::new(),
        };
        for (tenant, rows) in rows {
            ring.install(&tenant, rows)?;
        }
        Ok(Vault {
            backing: Backing::Shared(pool),
            rotate_after: ROTATE_AFTER,
            refresh: SHARED_REFRESH,
            ring: Mutex::new(ring),
        })
    }

    /// Lowers the rotation threshold (tests exercise rotation with it).
    pub fn with_rotation_after(mut self, encryptions: u64) -> Vault {
        self.rotate_after = encryptions.max(1);
        self
    }

    /// How long a shared keyring's copy of a tenant's keys is trusted.
    pub fn with_refresh(mut self, refresh: Duration) -> Vault {
        self.refresh = refresh;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the ring consistent (every
        // mutation saves before it returns), so poisoning is not fatal.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kek_id(&self) -> String {
        self.lock().kek.id().to_owned()
    }

    pub fn kek_source(&self) -> KekSource {
        self.lock().source.clone()
    }

    /// Shared keyring: reads the tenant's keys again if this process has
    /// none, saw a newer version than it holds, or read them longer ago
    /// than the refresh interval. True if it read them.
    pub async fn ready(&self, tenant: &str) -> Result<bool, VaultError> {
        let Backing::Shared(pool) = &self.backing else {
            return Ok(false);
        };
        let fresh = {
            let ring = self.lock();
            ring.open
                .get(tenant)
                .is_some_and(|t| !t.stale && t.loaded_at.elapsed() < self.refresh)
        };
        if fresh {
            return Ok(false);
        }
        let rows = shared::tenant(pool, tenant).await?;
        self.lock().install(tenant, rows)?;
        Ok(true)
    }

    /// Creates the tenant's first data key (a no-op if it has one).
    pub async fn create_tenant_key(&self, tenant: &str) -> Result<(), VaultError> {
        self.add_version(tenant, 1).await
    }

    /// Adds `version` of the tenant's data key unless some process already
    /// did (then its key is the one used).
    async fn add_version(&self, tenant: &str, version: u32) -> Result<(), VaultError> {
        match &self.backing {
            Backing::File(_) => {
                let mut ring = self.lock();
                if ring.newest(tenant) >= version {
                    return Ok(());
                }
                let (key, wrapped) = new_data_key(&ring.kek, tenant, version);
                ring.file
                    .tenants
                    .entry(tenant.to_owned())
                    .or_default()
                    .push(wrapped);
                ring.open
                    .entry(tenant.to_owned())
                    .or_insert_with(|| TenantKeys::fresh(Vec::new()))
                    .keys
                    .push(key);
                self.save(&ring)
            }
            Backing::Shared(pool) => {
                self.ready(tenant).await?;
                let (kek_id, wrapped) = {
                    let ring = self.lock();
                    if ring.newest(tenant) >= version {
                        return Ok(());
                    }
                    let (_, wrapped) = new_data_key(&ring.kek, tenant, version);
                    (ring.kek.id().to_owned(), wrapped)
                };
                shared::insert(pool, tenant, &kek_id, &wrapped).await?;
                let rows = shared::tenant(pool, tenant).await?;
                self.lock().install(tenant, rows)
            }
        }
    }

    /// Destroys every version of the tenant's data key: what was sealed under
    /// it can never be opened again (other gateways of a shared keyring
    /// drop their copy within the refresh interval).
    pub async fn destroy_tenant_key(&self, tenant: &str) -> Result<(), VaultError> {
        if let Backing::Shared(pool) = &self.backing {
            shared::delete(pool, tenant).await?;
        }
        let mut ring = self.lock();
        ring.open.remove(tenant);
        ring.file.tenants.remove(tenant);
        match self.backing {
            Backing::File(_) => self.save(&ring),
            Backing::Shared(_) => Ok(()),
        }
    }

    /// A MAC key of `owner`'s first data key (made if `owner` has none):
    /// stable for as long as the key lives, wrapped by the KEK like every
    /// data key (so a KEK rotation keeps it), and useless to whoever holds
    /// the database but not the KEK. The audit chain is keyed with
    /// [`AUDIT_KEY_OWNER`]'s.
    pub async fn mac_key(&self, owner: &str) -> Result<[u8; 32], VaultError> {
        let held = |v: &Vault| {
            v.lock()
                .open
                .get(owner)
                .and_then(|t| t.keys.first())
                .map(|k| *k.mac)
        };
        // The first version never changes and no shred destroys it: once
        // held, no need to ask the database again (it may be away).
        if let Some(key) = held(self) {
            return Ok(key);
        }
        self.ready(owner).await?;
        if self.lock().newest(owner) == 0 {
            self.create_tenant_key(owner).await?;
        }
        held(self).ok_or_else(|| VaultError::NoDataKey(owner.to_owned()))
    }

    /// Seals `plaintext` under the tenant's newest data key.
    pub async fn seal(&self, at: Binding<'_>, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        self.ready(at.tenant).await?;
        loop {
            let need = {
                let mut ring = self.lock();
                match ring.try_seal(at, plaintext, self.rotate_after)? {
                    Ok(sealed) => return Ok(sealed),
                    Err(need) => need,
                }
            };
            match need {
                Need::Version(version) => self.add_version(at.tenant, version).await?,
                Need::Reservation(version) => self.reserve(at.tenant, version).await?,
            }
        }
    }

    /// Counts `RESERVE_STEP` more encryptions for the tenant's key `version`
    /// where they survive a restart (and, shared, where every gateway counts).
    async fn reserve(&self, tenant: &str, version: u32) -> Result<(), VaultError> {
        let shared_total = match &self.backing {
            Backing::File(_) => None,
            Backing::Shared(pool) => {
                let total = shared::reserve(pool, tenant, version, RESERVE_STEP).await?;
                if total.is_none() {
                    // Shredded by another gateway.
                    self.lock().open.remove(tenant);
                    return Err(VaultError::NoDataKey(tenant.to_owned()));
                }
                total
            }
        };
        let mut guard = self.lock();
        let ring = &mut *guard;
        let Some(key) = ring
            .open
            .get_mut(tenant)
            .and_then(|t| t.keys.iter_mut().find(|k| k.version == version))
        else {
            return Err(VaultError::NoDataKey(tenant.to_owned()));
        };
        match shared_total {
            Some(total) => {
                key.used = total - RESERVE_STEP;
                key.limit = total;
                Ok(())
            }
            None => {
                let wrapped = ring
                    .file
                    .tenants
                    .get_mut(tenant)
                    .and_then(|v| v.iter_mut().find(|w| w.version == version))
                    .expect("every open key has its wrapped form");
                wrapped.reserved = key.limit + RESERVE_STEP;
                key.limit = wrapped.reserved;
                self.save(ring)
            }
        }
    }

    /// Opens what `seal` made for exactly this binding.
    pub async fn open_sealed(&self, at: Binding<'_>, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        self.ready(at.tenant).await?;
        let first = self.open_cached(at, sealed);
        if first.is_err() && self.ready(at.tenant).await? {
            return self.open_cached(at, sealed);
        }
        first
    }

    /// `open_sealed` with the keys this process holds now (after `ready`).
    pub fn open_cached(&self, at: Binding<'_>, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        self.lock().open_sealed(at, sealed)
    }

    /// Re-wraps every data key under `new` and saves the keyring; content is
    /// untouched. The caller then replaces the KEK wherever it lives (with a
    /// shared keyring: in every gateway, which refuses keys wrapped under
    /// another KEK than its own).
    pub async fn rotate_kek(&self, new: Kek) -> Result<String, VaultError> {
        match &self.backing {
            Backing::File(path) => {
                let mut ring = self.lock();
                let mut file = KeyringFile {
                    kek_id: new.id().to_owned(),
                    tenants: BTreeMap::new(),
                };
                for (tenant, versions) in &ring.file.tenants {
                    let mut rewrapped = Vec::new();
                    for w in versions {
                        let key = unwrap_bytes(&ring.kek, tenant, w).map_err(|_| {
                            VaultError::Keyring {
                                path: path.clone(),
                                message: format!("data key of {tenant} does not open"),
                            }
                        })?;
                        rewrapped.push(WrappedKey {
                            version: w.version,
                            wrapped: wrap_bytes(&new, tenant, w.version, &key),
                            reserved: w.reserved,
                        });
                    }
                    file.tenants.insert(tenant.clone(), rewrapped);
                }
                let old = std::mem::replace(&mut ring.file, file);
                if let Err(e) = self.save(&ring) {
                    ring.file = old;
                    return Err(e);
                }
                ring.kek = new;
                Ok(ring.kek.id().to_owned())
            }
            Backing::Shared(pool) => {
                let rewrap = |tenant: &str, row: &SharedRow| -> Result<String, VaultError> {
                    let ring = self.lock();
                    if row.kek_id != ring.kek.id() {
                        return Err(VaultError::Kek(format!(
                            "the data key of {tenant} is wrapped under KEK {}, not this process's {}",
                            row.kek_id,
                            ring.kek.id()
                        )));
                    }
                    let key = unwrap_bytes(&ring.kek, tenant, &row.key).map_err(|_| {
                        VaultError::Kek(format!("the data key of {tenant} does not open"))
                    })?;
                    Ok(wrap_bytes(&new, tenant, row.key.version, &key))
                };
                shared::rewrap_all(pool, new.id(), rewrap).await?;
                let mut ring = self.lock();
                ring.kek = new;
                Ok(ring.kek.id().to_owned())
            }
        }
    }

    /// Rotation for a KEK kept in a file: the new KEK is written beside the
    /// old one (`<file>.new`), the keyring re-wrapped, then the new file
    /// renamed over the old, so a crash in between leaves a KEK that opens
    /// the keyring in one of the two files (see `Kek::pending_rotation`).
    pub async fn rotate_kek_to_file(&self, new: Kek, file: &Path) -> Result<String, VaultError> {
        let pending = pending_path(file);
        new.write_to(&pending)?;
        let id = self.rotate_kek(new).await?;
        std::fs::rename(&pending, file)
            .map_err(|e| VaultError::Kek(format!("cannot replace {}: {e}", file.display())))?;
        self.lock().source = KekSource::File(file.to_owned());
        Ok(id)
    }

    fn save(&self, ring: &Ring) -> Result<(), VaultError> {
        let Backing::File(path) = &self.backing else {
            return Ok(());
        };
        let text = serde_json::to_vec_pretty(&ring.file).expect("keyring serialises");
        write_private(path, &text).map_err(|e| VaultError::Keyring {
            path: path.clone(),
            message: e.to_string(),
        })
    }
}

/// The keyring file at `path` (empty if there is none), which must have
/// been wrapped under `kek`.
fn read_keyring(path: &Path, kek: &Kek) -> Result<KeyringFile, VaultError> {
    let keyring_err = |message: String| VaultError::Keyring {
        path: path.to_owned(),
        message,
    };
    let file = match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice::<KeyringFile>(&bytes).map_err(|e| keyring_err(e.to_string()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeyringFile {
            kek_id: kek.id().to_owned(),
            tenants: BTreeMap::new(),
        },
        Err(e) => return Err(keyring_err(e.to_string())),
    };
    if file.kek_id != kek.id() {
        return Err(keyring_err(format!(
            "wrapped under KEK {}, but the KEK given is {}",
            file.kek_id,
            kek.id()
        )));
    }
    Ok(file)
}

/// A new random data key and its wrapped form.
fn new_data_key(kek: &Kek, tenant: &str, version: u32) -> (DataKey, WrappedKey) {
    let key: Zeroizing<[u8; 32]> = Zeroizing::new(Aes256Gcm::generate_key(OsRng).into());
    let wrapped = WrappedKey {
        version,
        wrapped: wrap_bytes(kek, tenant, version, &key),
        reserved: 0,
    };
    (DataKey::new(version, &key, 0), wrapped)
}

impl DataKey {
    /// The opened form of `raw`, counted as used up to `used`.
    fn new(version: u32, raw: &[u8; 32], used: u64) -> DataKey {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(raw).expect("any key length");
        mac.update(b"strata-mac-key");
        DataKey {
            version,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(raw.as_slice())),
            mac: Zeroizing::new(mac.finalize().into_bytes().into()),
            used,
            limit: used,
        }
    }
}

fn wrap_aad(tenant: &str, version: u32) -> Vec<u8> {
    format!("strata-data-key\0{tenant}\0{version}").into_bytes()
}

fn wrap_bytes(kek: &Kek, tenant: &str, version: u32, key: &[u8; 32]) -> String {
    let nonce = Aes256Gcm::generate_nonce(OsRng);
    let sealed = kek
        .cipher()
        .encrypt(
            &nonce,
            Payload {
                msg: key,
                aad: &wrap_aad(tenant, version),
            },
        )
        .expect("AES-GCM encryption of 32 bytes cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    hex::encode(out)
}

fn unwrap_bytes(kek: &Kek, tenant: &str, w: &WrappedKey) -> Result<Zeroizing<[u8; 32]>, ()> {
    let bytes = hex::decode(&w.wrapped).map_err(|_| ())?;
    if bytes.len() <= NONCE_LEN {
        return Err(());
    }
    let plain = Zeroizing::new(
        kek.cipher()
            .decrypt(
                Nonce::from_slice(&bytes[..NONCE_LEN]),
                Payload {
                    msg: &bytes[NONCE_LEN..],
                    aad: &wrap_aad(tenant, w.version),
                },
            )
            .map_err(|_| ())?,
    );
    let array: [u8; 32] = plain.as_slice().try_into().map_err(|_| ())?;
    Ok(Zeroizing::new(array))
}

fn pending_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Writes `bytes` to a temporary file with mode 0600, syncs it and renames it
/// over `path`.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at<'a>(tenant: &'a str, row: &'a str) -> Binding<'a> {
        Binding {
            tenant,
            table: "stored_completions",
            row,
        }
    }

    fn vault(dir: &Path) -> Vault {
        let kek = Kek::from_hex(&"11".repeat(32)).unwrap();
        Vault::open(&dir.join("keyring.json"), kek, KekSource::Environment).unwrap()
    }

    #[tokio::test]
    async fn sealed_content_opens_only_where_it_was_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        v.create_tenant_key("a").await.unwrap();
        v.create_tenant_key("b").await.unwrap();
        let sealed = v.seal(at("a", "r1"), b"canary-secret").await.unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"canary"));
        assert_eq!(
            v.open_cached(at("a", "r1"), &sealed).unwrap(),
            b"canary-secret"
        );
        assert!(matches!(
            v.open_cached(at("b", "r1"), &sealed),
            Err(VaultError::Open)
        ));
        assert!(matches!(
            v.open_cached(at("a", "r2"), &sealed),
            Err(VaultError::Open)
        ));
        let other_table = Binding {
            table: "audit",
            ..at("a", "r1")
        };
        assert!(v.open_cached(other_table, &sealed).is_err());
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(v.open_cached(at("a", "r1"), &tampered).is_err());
    }

    #[tokio::test]
    async fn keys_survive_a_restart_and_shredding_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = {
            let v = vault(dir.path());
            v.create_tenant_key("a").await.unwrap();
            v.seal(at("a", "r1"), b"hello").await.unwrap()
        };
        let v = vault(dir.path());
        assert_eq!(v.open_cached(at("a", "r1"), &sealed).unwrap(), b"hello");
        v.destroy_tenant_key("a").await.unwrap();
        assert!(v.open_cached(at("a", "r1"), &sealed).is_err());
        // A new tenant key under the same id does not bring old content back.
        v.create_tenant_key("a").await.unwrap();
        assert!(v.open_cached(at("a", "r1"), &sealed).is_err());
        let text = std::fs::read_to_string(dir.path().join("keyring.json")).unwrap();
        assert!(
            !text.contains(&"11".repeat(32)),
            "the KEK is never in the keyring"
        );
    }

    #[tokio::test]
    async fn a_wrong_kek_refuses_to_open_the_keyring() {
        let dir = tempfile::tempdir().unwrap();
        vault(dir.path()).create_tenant_key("a").await.unwrap();
        let other = Kek::from_hex(&"22".repeat(32)).unwrap();
        let err = Vault::open(
            &dir.path().join("keyring.json"),
            other,
            KekSource::Environment,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("KEK"), "{err}");
    }

    #[tokio::test]
    async fn kek_rotation_rewraps_without_touching_content() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        v.create_tenant_key("a").await.unwrap();
        let sealed = v.seal(at("a", "r1"), b"kept").await.unwrap();
        let before = std::fs::read_to_string(dir.path().join("keyring.json")).unwrap();
        let new_id = v
            .rotate_kek(Kek::from_hex(&"33".repeat(32)).unwrap())
            .await
            .unwrap();
        assert_eq!(v.open_cached(at("a", "r1"), &sealed).unwrap(), b"kept");
        drop(v);
        let after = std::fs::read_to_string(dir.path().join("keyring.json")).unwrap();
        assert_ne!(before, after);
        // The old KEK no longer opens the keyring; the new one does.
        let old = Kek::from_hex(&"11".repeat(32)).unwrap();
        assert!(Vault::open(
            &dir.path().join("keyring.json"),
            old,
            KekSource::Environment
        )
        .is_err());
        let new = Kek::from_hex(&"33".repeat(32)).unwrap();
        assert_eq!(new.id(), new_id);
        let v = Vault::open(
            &dir.path().join("keyring.json"),
            new,
            KekSource::Environment,
        )
        .unwrap();
        assert_eq!(v.open_cached(at("a", "r1"), &sealed).unwrap(), b"kept");
    }

    #[tokio::test]
    async fn file_rotation_replaces_the_kek_file_and_leaves_nothing_pending() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kek");
        let (kek, source, _) = Kek::load(None, None, &file).unwrap();
        let v = Vault::open(&dir.path().join("keyring.json"), kek, source).unwrap();
        v.create_tenant_key("a").await.unwrap();
        let sealed = v.seal(at("a", "r"), b"x").await.unwrap();
        let id = v.rotate_kek_to_file(Kek::generate(), &file).await.unwrap();
        assert!(Kek::pending_rotation(&file).is_none());
        drop(v);
        let (kek, source, generated) = Kek::load(None, None, &file).unwrap();
        assert!(!generated);
        assert_eq!(kek.id(), id);
        let v = Vault::open(&dir.path().join("keyring.json"), kek, source).unwrap();
        assert_eq!(v.open_cached(at("a", "r"), &sealed).unwrap(), b"x");
    }

    #[tokio::test]
    async fn data_keys_rotate_after_the_limit_and_old_content_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path()).with_rotation_after(3);
        v.create_tenant_key("a").await.unwrap();
        let mut sealed = Vec::new();
        for i in 0..10 {
            sealed.push(v.seal(at("a", &i.to_string()), b"x").await.unwrap());
        }
        let versions: std::collections::BTreeSet<u32> = sealed
            .iter()
            .map(|s| u32::from_be_bytes(s[2..6].try_into().unwrap()))
            .collect();
        assert_eq!(versions.len(), 4, "10 seals at 3 per key use 4 keys");
        for (i, s) in sealed.iter().enumerate() {
            assert_eq!(v.open_cached(at("a", &i.to_string()), s).unwrap(), b"x");
        }
    }

    #[tokio::test]
    async fn kek_load_generates_once_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let default = dir.path().join("kek");
        let (k1, _, generated) = Kek::load(None, None, &default).unwrap();
        assert!(generated);
        let mode = std::fs::metadata(&default).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (k2, source, generated) = Kek::load(None, None, &default).unwrap();
        assert!(!generated);
        assert_eq!(k1.id(), k2.id());
        assert_eq!(source, KekSource::File(default.clone()));
        let missing = dir.path().join("nope");
        assert!(
            Kek::load(None, Some(&missing), &default).is_err(),
            "a named file must exist"
        );
        assert!(Kek::load(Some("zz"), None, &default).is_err());
    }
}
