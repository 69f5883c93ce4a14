//! `Store` backends. SQLite is the embedded default; PostgreSQL follows with
//! its own migrations behind the same trait. `vault` seals tenant content.

mod sqlite;
pub mod vault;

pub use sqlite::SqliteStore;
pub use vault::{Binding, Kek, KekSource, Vault, VaultError};
