//! What can go wrong with keys and sealed content.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("key-encryption key: {0}")]
    Kek(String),
    #[error("keyring {path}: {message}")]
    Keyring { path: PathBuf, message: String },
    #[error("shared keyring: {0}")]
    Shared(String),
    #[error("tenant {0} has no data key (deleted or never created)")]
    NoDataKey(String),
    /// Wrong tenant, table or row, a tampered ciphertext, or a key that is gone.
    #[error("ciphertext cannot be opened")]
    Open,
}
