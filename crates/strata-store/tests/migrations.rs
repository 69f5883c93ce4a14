//! A migration, once released, is never edited: sqlx keeps each applied
//! migration's checksum and refuses to start on a database where a file it
//! applied has since changed ("migration N was previously applied but has
//! been modified") — a deployment upgraded to such a build would not start.
//! `migrations/released.txt` pins every released migration's checksum; a
//! change goes in a new migration.

use sqlx::migrate::Migrator;

fn checksums(backend: &str, migrator: &Migrator) -> Vec<String> {
    migrator
        .iter()
        .map(|m| {
            let sum: String = m.checksum.iter().map(|b| format!("{b:02x}")).collect();
            format!("{backend} {:04} {sum}", m.version)
        })
        .collect()
}

#[test]
fn no_released_migration_is_edited_or_removed() {
    let now: Vec<String> = checksums("sqlite", &sqlx::migrate!("migrations/sqlite"))
        .into_iter()
        .chain(checksums(
            "postgres",
            &sqlx::migrate!("migrations/postgres"),
        ))
        .collect();
    let released = include_str!("../migrations/released.txt");
    let pinned: Vec<&str> = released
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    for line in &pinned {
        assert!(
            now.iter().any(|n| n == line),
            "released migration `{line}` was edited or removed: put the change in a new \
             migration and restore the file"
        );
    }
    for line in now.iter().filter(|n| !pinned.contains(&n.as_str())) {
        eprintln!("not yet released (append to migrations/released.txt once it lands): {line}");
    }
}
