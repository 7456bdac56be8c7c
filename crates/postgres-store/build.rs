// `sqlx::migrate!` embeds `migrations/` at compile time: rebuild when a migration is added or
// edited (cargo does not watch that directory otherwise).
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
