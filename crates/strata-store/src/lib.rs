//! `Store` backends. SQLite is the embedded default; PostgreSQL follows with
//! its own migrations behind the same trait.

mod sqlite;

pub use sqlite::SqliteStore;
