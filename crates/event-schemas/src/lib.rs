//! The Kafka events' schemas: one Avro record per event type and version, in
//! `schemas/events/<EventType>.v<N>.avsc`.
//!
//! Two checks keep them honest:
//! - [`SchemaSet::check_backward_transitive`]: every version of a type reads data written by
//!   every earlier one (Confluent's BACKWARD_TRANSITIVE), judged by Avro's schema-resolution
//!   rules in `apache-avro` and then by decoding a sample written with the old schema.
//! - [`SchemaSet::validate`]: an event's JSON payload, as the outbox holds it, converts to a
//!   datum of its schema with nothing left over (a field the schema does not name fails, so a
//!   new field cannot ship without a new schema version).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apache_avro::schema::{RecordSchema, Schema, UnionSchema};
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;

/// The repository's schema directory (`schemas/events`), for tests and the checker.
pub fn repo_schemas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/events")
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}: the name must be <EventType>.v<N>.avsc")]
    BadName(PathBuf),
    #[error("{0}: not an Avro schema: {1}")]
    BadSchema(PathBuf, String),
    #[error("{0}: the schema is a {1}, not a record named after the file")]
    NotTheRecord(PathBuf, String),
    #[error("{event_type}: versions must run 1, 2, 3, ... without a gap; found {found:?}")]
    Gap { event_type: String, found: Vec<u32> },
}

/// One event type's versions, oldest first (index 0 is v1).
#[derive(Debug)]
pub struct Versions {
    pub schemas: Vec<(Schema, PathBuf)>,
}

/// Every event type's schemas, loaded from a directory.
#[derive(Debug)]
pub struct SchemaSet {
    pub types: BTreeMap<String, Versions>,
}

/// A version that cannot read data an earlier version wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    pub event_type: String,
    pub reader: u32,
    pub writer: u32,
    pub why: String,
}

impl std::fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} v{} cannot read data written with v{}: {}",
            self.event_type, self.reader, self.writer, self.why
        )
    }
}

impl SchemaSet {
    pub fn load(dir: &Path) -> Result<SchemaSet, LoadError> {
        let mut found: BTreeMap<String, BTreeMap<u32, (Schema, PathBuf)>> = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| LoadError::Io(dir.into(), e))?;
        for entry in entries {
            let path = entry.map_err(|e| LoadError::Io(dir.into(), e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("avsc") {
                continue;
            }
            let (event_type, version) =
                parse_name(&path).ok_or_else(|| LoadError::BadName(path.clone()))?;
            let text =
                std::fs::read_to_string(&path).map_err(|e| LoadError::Io(path.clone(), e))?;
            let schema = Schema::parse_str(&text)
                .map_err(|e| LoadError::BadSchema(path.clone(), e.to_string()))?;
            match &schema {
                Schema::Record(r) if r.name.name == event_type => {}
                other => {
                    return Err(LoadError::NotTheRecord(
                        path.clone(),
                        format!("{:?}", apache_avro::schema::SchemaKind::from(other)),
                    ))
                }
            }
            found
                .entry(event_type)
                .or_default()
                .insert(version, (schema, path));
        }
        let mut types = BTreeMap::new();
        for (event_type, by_version) in found {
            let numbers: Vec<u32> = by_version.keys().copied().collect();
            if numbers.iter().copied().ne(1..=numbers.len() as u32) {
                return Err(LoadError::Gap {
                    event_type,
                    found: numbers,
                });
            }
            types.insert(
                event_type,
                Versions {
                    schemas: by_version.into_values().collect(),
                },
            );
        }
        Ok(SchemaSet { types })
    }

    /// Every pair (earlier writer, later reader) of every type; empty when all is compatible.
    pub fn check_backward_transitive(&self) -> Vec<Incompatibility> {
        let mut broken = Vec::new();
        for (event_type, versions) in &self.types {
            for (r, (reader, _)) in versions.schemas.iter().enumerate() {
                for (w, (writer, _)) in versions.schemas.iter().enumerate().take(r) {
                    if let Err(why) = can_read(writer, reader) {
                        broken.push(Incompatibility {
                            event_type: event_type.clone(),
                            reader: r as u32 + 1,
                            writer: w as u32 + 1,
                            why,
                        });
                    }
                }
            }
        }
        broken
    }

    /// The schema of `event_type` at `version`.
    pub fn schema(&self, event_type: &str, version: i32) -> Option<&Schema> {
        let index = usize::try_from(version).ok()?.checked_sub(1)?;
        self.types
            .get(event_type)?
            .schemas
            .get(index)
            .map(|(s, _)| s)
    }

    /// Checks an outbox payload against its schema: it converts to a datum of the schema with
    /// every field accounted for, and the datum encodes.
    pub fn validate(
        &self,
        event_type: &str,
        version: i32,
        payload: &serde_json::Value,
    ) -> Result<(), String> {
        let schema = self
            .schema(event_type, version)
            .ok_or_else(|| format!("no schema for {event_type} v{version}"))?;
        let datum = to_datum(payload, schema).map_err(|e| format!("{event_type}: {e}"))?;
        apache_avro::to_avro_datum(schema, datum)
            .map(|_| ())
            .map_err(|e| format!("{event_type}: does not encode: {e}"))
    }
}

fn parse_name(path: &Path) -> Option<(String, u32)> {
    let stem = path.file_stem()?.to_str()?;
    let (name, version) = stem.rsplit_once(".v")?;
    let version: u32 = version.parse().ok()?;
    (!name.is_empty() && version > 0).then(|| (name.to_owned(), version))
}

/// Avro's resolution rules, then the proof: a sample written with `writer` decodes with
/// `reader`.
fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    SchemaCompatibility::can_read(writer, reader).map_err(|e| e.to_string())?;
    let sample = sample(writer);
    let bytes = apache_avro::to_avro_datum(writer, sample).map_err(|e| e.to_string())?;
    apache_avro::from_avro_datum(writer, &mut bytes.as_slice(), Some(reader))
        .map(|_| ())
        .map_err(|e| format!("a sample does not decode: {e}"))
}

/// A datum of `schema`: every field present, each with a plain value of its type.
fn sample(schema: &Schema) -> Value {
    match schema {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(true),
        Schema::Int => Value::Int(7),
        Schema::Long => Value::Long(7),
        Schema::Float => Value::Float(1.5),
        Schema::Double => Value::Double(1.5),
        Schema::String => Value::String("sample".into()),
        Schema::Bytes => Value::Bytes(vec![1, 2]),
        Schema::Array(a) => Value::Array(vec![sample(&a.items)]),
        Schema::Map(m) => Value::Map([("k".to_owned(), sample(&m.types))].into()),
        Schema::Union(u) => {
            // the last branch: with ["null", T] that is the interesting one
            let i = u.variants().len() - 1;
            Value::Union(i as u32, Box::new(sample(&u.variants()[i])))
        }
        Schema::Record(r) => Value::Record(
            r.fields
                .iter()
                .map(|f| (f.name.clone(), sample(&f.schema)))
                .collect(),
        ),
        Schema::Enum(e) => Value::Enum(0, e.symbols[0].clone()),
        Schema::Fixed(f) => Value::Fixed(f.size, vec![0; f.size]),
        // logical types and references: not used by our schemas
        other => Value::String(format!("{other:?}")),
    }
}

/// Converts JSON (as the outbox stores it) into a datum of `schema`, strictly: numbers must fit,
/// a record takes only the fields it names, and a missing field needs a default.
fn to_datum(json: &serde_json::Value, schema: &Schema) -> Result<Value, String> {
    use serde_json::Value as J;
    Ok(match (schema, json) {
        (Schema::Null, J::Null) => Value::Null,
        (Schema::Boolean, J::Bool(b)) => Value::Boolean(*b),
        (Schema::Int, J::Number(n)) => Value::Int(
            n.as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .ok_or_else(|| format!("{n} is not an int"))?,
        ),
        (Schema::Long, J::Number(n)) => {
            Value::Long(n.as_i64().ok_or_else(|| format!("{n} is not a long"))?)
        }
        (Schema::Double | Schema::Float, J::Number(n)) => {
            Value::Double(n.as_f64().ok_or_else(|| format!("{n} is not a number"))?)
        }
        (Schema::String, J::String(s)) => Value::String(s.clone()),
        (Schema::Enum(e), J::String(s)) => {
            let i = e
                .symbols
                .iter()
                .position(|x| x == s)
                .ok_or_else(|| format!("{s:?} is not one of {:?}", e.symbols))?;
            Value::Enum(i as u32, s.clone())
        }
        (Schema::Array(a), J::Array(items)) => Value::Array(
            items
                .iter()
                .map(|i| to_datum(i, &a.items))
                .collect::<Result<_, _>>()?,
        ),
        (Schema::Union(u), v) => union_datum(u, v)?,
        (Schema::Record(r), J::Object(fields)) => record_datum(r, fields)?,
        (s, v) => {
            return Err(format!(
                "{v} is not a {:?}",
                apache_avro::schema::SchemaKind::from(s)
            ))
        }
    })
}

fn union_datum(u: &UnionSchema, v: &serde_json::Value) -> Result<Value, String> {
    for (i, branch) in u.variants().iter().enumerate() {
        if let Ok(d) = to_datum(v, branch) {
            return Ok(Value::Union(i as u32, Box::new(d)));
        }
    }
    Err(format!("{v} matches no branch of the union"))
}

fn record_datum(
    r: &RecordSchema,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<Value, String> {
    if let Some(extra) = fields.keys().find(|k| !r.lookup.contains_key(*k)) {
        return Err(format!(
            "field {extra:?} is not in the schema {} (add it in a new version)",
            r.name.name
        ));
    }
    let mut out = Vec::with_capacity(r.fields.len());
    for f in &r.fields {
        let v = match (fields.get(&f.name), &f.default) {
            (Some(v), _) => {
                to_datum(v, &f.schema).map_err(|e| format!("field {:?}: {e}", f.name))?
            }
            (None, Some(d)) => to_datum(d, &f.schema)
                .or_else(|_| match &f.schema {
                    // a union's default is a value of its first branch
                    Schema::Union(u) => {
                        to_datum(d, &u.variants()[0]).map(|x| Value::Union(0, Box::new(x)))
                    }
                    _ => Err("bad default".to_owned()),
                })
                .map_err(|e| format!("field {:?}: {e}", f.name))?,
            (None, None) => return Err(format!("field {:?} is missing", f.name)),
        };
        out.push((f.name.clone(), v));
    }
    Ok(Value::Record(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixtures(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../schemas/fixtures")
            .join(name)
    }

    #[test]
    fn the_real_schemas_are_backward_transitive() {
        let set = SchemaSet::load(&repo_schemas()).unwrap();
        assert!(set.types.len() >= 11, "{:?}", set.types.keys());
        let broken = set.check_backward_transitive();
        assert!(broken.is_empty(), "{broken:?}");
    }

    #[test]
    fn compatible_evolutions_pass() {
        // v2 adds a field with a default, v3 drops a field and widens int to long
        let set = SchemaSet::load(&fixtures("compatible")).unwrap();
        assert_eq!(set.types["OrderPaid"].schemas.len(), 3);
        assert_eq!(set.check_backward_transitive(), vec![]);
    }

    #[test]
    fn a_breaking_change_fails_even_when_it_reads_the_previous_version() {
        // v3 drops the default of v2's new field: v3 reads v2 (which always has the field),
        // not v1. A check of neighbours only would pass it; BACKWARD_TRANSITIVE does not.
        let set = SchemaSet::load(&fixtures("broken")).unwrap();
        let broken = set.check_backward_transitive();
        assert_eq!(broken.len(), 1, "{broken:?}");
        assert_eq!(
            (
                broken[0].event_type.as_str(),
                broken[0].reader,
                broken[0].writer
            ),
            ("OrderPaid", 3, 1)
        );
        assert!(broken[0].to_string().contains("channel"), "{}", broken[0]);
    }

    #[test]
    fn validation_is_strict() {
        let set = SchemaSet::load(&repo_schemas()).unwrap();
        let good = json!({"order_id": "o", "user_id": "u", "sku_id": "s", "store_id": "b",
                          "quantity": 2, "amount_cents": 5000, "expires_at": "2026-11-30T00:00:00Z"});
        set.validate("OrderCreated", 1, &good).unwrap();
        let mut extra = good.clone();
        extra["coupon"] = json!("X");
        assert!(set
            .validate("OrderCreated", 1, &extra)
            .unwrap_err()
            .contains("coupon"));
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("expires_at");
        assert!(set
            .validate("OrderCreated", 1, &missing)
            .unwrap_err()
            .contains("expires_at"));
        let mut wrong = good.clone();
        wrong["quantity"] = json!(1u64 << 40);
        assert!(set.validate("OrderCreated", 1, &wrong).is_err());
        assert!(set.validate("OrderCreated", 2, &good).is_err());
        // an optional field: absent, null or a string
        let expired = json!({"order_id": "o", "user_id": "u", "sku_id": "s", "store_id": "b",
                             "quantity": 2, "amount_cents": 5000});
        set.validate("OrderExpired", 1, &expired).unwrap();
        let mut with_reason = expired.clone();
        with_reason["reason"] = json!("lost answer");
        set.validate("OrderExpired", 1, &with_reason).unwrap();
    }

    #[test]
    fn a_file_that_is_not_its_record_is_refused() {
        let dir = std::env::temp_dir().join(format!("schemas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("OrderPaid.v1.avsc"),
            r#"{"type":"record","name":"Other","fields":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            SchemaSet::load(&dir),
            Err(LoadError::NotTheRecord(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
