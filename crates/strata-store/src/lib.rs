//! `Store` backends. SQLite is the embedded default; PostgreSQL follows with
//! its own migrations behind the same trait. `vault` seals tenant content.

mod sql;
pub mod vault;

pub use sql::{Dialect, SqlStore};
pub use vault::{Binding, Kek, KekSource, Vault, VaultError};
