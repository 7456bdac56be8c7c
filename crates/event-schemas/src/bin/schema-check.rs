//! `schema-check [DIR...]`: loads each directory of `<EventType>.v<N>.avsc` files (default:
//! the repository's `schemas/events`) and checks BACKWARD_TRANSITIVE compatibility. Exits 1,
//! naming every incompatible pair, when a version cannot read what an earlier one wrote.

use std::path::PathBuf;
use std::process::ExitCode;

use event_schemas::{repo_schemas, SchemaSet};

fn main() -> ExitCode {
    let dirs: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let dirs = if dirs.is_empty() {
        vec![repo_schemas()]
    } else {
        dirs
    };
    let mut failed = false;
    for dir in dirs {
        match SchemaSet::load(&dir) {
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                failed = true;
            }
            Ok(set) => {
                let versions: usize = set.types.values().map(|v| v.schemas.len()).sum();
                let broken = set.check_backward_transitive();
                for b in &broken {
                    eprintln!("INCOMPATIBLE {b}");
                }
                println!(
                    "{}: {} event types, {versions} schema versions, {} incompatible pairs",
                    dir.display(),
                    set.types.len(),
                    broken.len()
                );
                failed |= !broken.is_empty();
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
