//! A tenant's data key as it is kept: wrapped by the KEK, in the keyring
//! file or in a row of the shared table.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct WrappedKey {
    pub(super) version: u32,
    /// Nonce followed by the AES-GCM ciphertext of the data key, hex.
    pub(super) wrapped: String,
    /// Encryptions this version may have made (reserved ahead in steps).
    pub(super) reserved: u64,
}

/// One row of the shared table.
pub(super) struct SharedRow {
    pub(super) kek_id: String,
    pub(super) key: WrappedKey,
}
