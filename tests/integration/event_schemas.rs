//! The events' Avro schemas: one per event type the code writes, all BACKWARD_TRANSITIVE, and
//! the checker (the `schema-check` binary CI can run alone) failing on a broken history. That
//! every emitted event fits its schema is checked where the events are made: the end-to-end,
//! compensation and chaos tests call `assert_emitted_events_match_schemas` on their outbox.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use event_schemas::{repo_schemas, SchemaSet};

#[test]
fn every_event_type_the_code_writes_has_a_schema_and_no_schema_is_orphaned() {
    let set = SchemaSet::load(&repo_schemas()).unwrap();
    let schemas: BTreeSet<&str> = set.types.keys().map(String::as_str).collect();
    let code: BTreeSet<&str> = fulfillment::events::EVENT_TYPES.iter().copied().collect();
    assert_eq!(schemas, code);
    assert!(set.check_backward_transitive().is_empty());
}

#[test]
fn the_schema_checker_passes_the_real_schemas_and_fails_a_broken_history() {
    let bin = integration_tests::binaries::bin_path("schema-check");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/fixtures");
    let good = Command::new(&bin)
        .arg(repo_schemas())
        .arg(fixtures.join("compatible"))
        .output()
        .unwrap();
    assert!(good.status.success(), "{good:?}");
    let bad = Command::new(&bin)
        .arg(fixtures.join("broken"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("OrderPaid v3 cannot read data written with v1")
            && stderr.contains("channel"),
        "{stderr}"
    );
    println!("schema-check on the broken fixture: {}", stderr.trim());
}
