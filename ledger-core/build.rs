//! Rebuilds the crate when a migration changes: `db::MIGRATIONS` embeds the
//! `migrations/` folder at compile time, and cargo does not otherwise see new files there.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
