//! Outbox rows made into Kafka messages, a round at a time: the wire form every consumer
//! reads. The body is a JSON envelope `{"event_id","event_type","schema_version",
//! "aggregate_type","aggregate_id","occurred_at","data"}`, `data` being the payload's JSON
//! text as Postgres holds it (never parsed here); the key is the aggregate id; the headers
//! name the event (so a consumer can drop a duplicate before decoding the body) and carry the
//! trace context.
//!
//! A round's keys and bodies share one buffer, and columns are read by position straight out
//! of the row: building a message allocates nothing of its own (the relay spent more of its
//! time in `malloc` than anywhere else when each row became owned strings first).

use std::ops::Range;

use rdkafka::message::{Header, OwnedHeaders};
use sqlx::postgres::PgRow;
use sqlx::{Row, ValueRef};
use uuid::Uuid;

/// How many columns `message_columns!` names.
const COLUMNS: usize = 9;

/// The columns [`Batch::push`] reads, in its order, for a table named `o`.
macro_rules! message_columns {
    () => {
        "o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, o.schema_version,
         o.traceparent, o.created_at, o.payload::text AS payload"
    };
}
pub(crate) use message_columns;

/// One message of a [`Batch`].
pub struct Message {
    pub(crate) key: Range<usize>,
    pub(crate) body: Range<usize>,
    /// For the dead compensations topic (`CompensationFailed`).
    pub dead: bool,
    pub headers: OwnedHeaders,
}

/// A round's messages, in the order of the rows they came from.
#[derive(Default)]
pub struct Batch {
    /// Every message's key and body, back to back.
    pub(crate) bytes: Vec<u8>,
    pub messages: Vec<Message>,
}

impl Batch {
    pub fn with_capacity(rows: usize) -> Batch {
        Batch {
            bytes: Vec::with_capacity(rows * 512),
            messages: Vec::with_capacity(rows),
        }
    }

    /// Empty again, its buffers kept for the next round.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.messages.clear();
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Message `m`'s key and body.
    pub fn key_and_body(&self, m: &Message) -> (&[u8], &[u8]) {
        (&self.bytes[m.key.clone()], &self.bytes[m.body.clone()])
    }

    /// Appends the message of a row read with `message_columns!`; returns the row's id.
    pub fn push(&mut self, row: &PgRow) -> Result<i64, sqlx::Error> {
        let mut fields = [None; COLUMNS];
        for (i, f) in fields.iter_mut().enumerate() {
            *f = bytes(row, i)?;
        }
        self.push_fields(fields)
    }

    /// Appends the message of a row given as the bytes Postgres sent for each of
    /// `message_columns!` (binary format: big-endian integers, a uuid's 16 bytes, a timestamp's
    /// microseconds since 2000, a text's UTF-8; `None` for NULL), which is all the message
    /// needs: no column is converted twice. Returns the row's id.
    fn push_fields(&mut self, f: [Option<&[u8]>; COLUMNS]) -> Result<i64, sqlx::Error> {
        let id = i64::from_be_bytes(fixed(&f, 0)?);
        let event_id = Uuid::from_bytes(fixed(&f, 1)?);
        let aggregate_type = f[2].unwrap_or_default();
        let aggregate_id = f[3].unwrap_or_default();
        let event_type = f[4].unwrap_or_default();
        let schema_version = i32::from_be_bytes(fixed(&f, 5)?);
        let traceparent = f[6];
        let created_at = i64::from_be_bytes(fixed(&f, 7)?);
        let payload = f[8].unwrap_or_default();

        let mut uuid = Uuid::encode_buffer();
        let event_id = &*event_id.hyphenated().encode_lower(&mut uuid);
        let mut version = itoa::Buffer::new();
        let version = version.format(schema_version);

        let b = &mut self.bytes;
        let key = append(b, |b| b.extend_from_slice(aggregate_id));
        let body = append(b, |b| {
            b.extend_from_slice(b"{\"event_id\":\"");
            b.extend_from_slice(event_id.as_bytes());
            b.extend_from_slice(b"\",\"event_type\":");
            json_str(b, event_type);
            b.extend_from_slice(b",\"schema_version\":");
            b.extend_from_slice(version.as_bytes());
            b.extend_from_slice(b",\"aggregate_type\":");
            json_str(b, aggregate_type);
            b.extend_from_slice(b",\"aggregate_id\":");
            json_str(b, aggregate_id);
            b.extend_from_slice(b",\"occurred_at\":\"");
            rfc3339_micros(b, created_at.saturating_add(POSTGRES_EPOCH_MICROS));
            b.extend_from_slice(b"\",\"data\":");
            b.extend_from_slice(payload);
            b.push(b'}');
        });
        let mut headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "event_id",
                value: Some(event_id),
            })
            .insert(Header {
                key: "event_type",
                value: Some(event_type),
            })
            .insert(Header {
                key: "schema_version",
                value: Some(version),
            });
        if let Some(tp) = traceparent {
            headers = headers.insert(Header {
                key: service_kit::trace::TRACEPARENT,
                value: Some(tp),
            });
        }
        self.messages.push(Message {
            key,
            body,
            dead: event_type == fulfillment::events::COMPENSATION_FAILED.as_bytes(),
            headers,
        });
        Ok(id)
    }
}

/// Microseconds from the Unix epoch to Postgres' (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Column `i` of `row` as the bytes Postgres sent; `None` for NULL.
fn bytes(row: &PgRow, i: usize) -> Result<Option<&[u8]>, sqlx::Error> {
    let value = row.try_get_raw(i)?;
    if value.is_null() {
        return Ok(None);
    }
    value
        .as_bytes()
        .map(Some)
        .map_err(|e| sqlx::Error::ColumnDecode {
            index: i.to_string(),
            source: e,
        })
}

/// Field `i`, a fixed-width value of `N` bytes (never NULL).
fn fixed<const N: usize>(f: &[Option<&[u8]>], i: usize) -> Result<[u8; N], sqlx::Error> {
    let decode = |source: String| sqlx::Error::ColumnDecode {
        index: i.to_string(),
        source: source.into(),
    };
    f[i].ok_or_else(|| decode("unexpected NULL".into()))?
        .try_into()
        .map_err(|_| decode(format!("expected {N} bytes")))
}

/// Runs `write` on `b` and returns the range it wrote.
fn append(b: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) -> Range<usize> {
    let start = b.len();
    write(b);
    start..b.len()
}

/// `s` (UTF-8, as Postgres sends text) as a JSON string: as it is between quotes when nothing
/// in it needs escaping (ids and type names never do), through serde_json otherwise.
fn json_str(b: &mut Vec<u8>, s: &[u8]) {
    if s.iter().all(|&c| c >= 0x20 && c != b'"' && c != b'\\') {
        b.push(b'"');
        b.extend_from_slice(s);
        b.push(b'"');
    } else {
        let s = String::from_utf8_lossy(s);
        serde_json::to_writer(&mut *b, &s).expect("a string serialises");
    }
}

/// `2026-12-01T15:04:05.123456Z`, as chrono's `to_rfc3339_opts(Micros, true)` writes it, from
/// microseconds since the Unix epoch, digit by digit (no formatting machinery, no `String`).
fn rfc3339_micros(b: &mut Vec<u8>, unix_micros: i64) {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000) as u32;
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let second_of_day = secs.rem_euclid(86_400) as u32;
    if !(0..=9999).contains(&year) {
        // beyond four-digit years (Postgres' infinity among them): chrono's form, or the sign
        let t = chrono::DateTime::from_timestamp_micros(unix_micros);
        let text = t.map_or_else(
            || {
                if unix_micros < 0 {
                    "-infinity".to_owned()
                } else {
                    "infinity".to_owned()
                }
            },
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        );
        return b.extend_from_slice(text.as_bytes());
    }
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let digits = |dst: &mut [u8], mut v: u32| {
        for x in dst.iter_mut().rev() {
            *x = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    digits(&mut out[0..4], year as u32);
    digits(&mut out[5..7], month);
    digits(&mut out[8..10], day);
    digits(&mut out[11..13], second_of_day / 3600);
    digits(&mut out[14..16], second_of_day / 60 % 60);
    digits(&mut out[17..19], second_of_day % 60);
    digits(&mut out[20..26], micros);
    b.extend_from_slice(&out);
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_and_escaped_only_when_they_need_it() {
        for s in [
            "order-1",
            "",
            "a \"quoted\" id",
            "back\\slash",
            "tab\there",
            "é ✓",
        ] {
            let mut b = Vec::new();
            json_str(&mut b, s.as_bytes());
            let back: String = serde_json::from_slice(&b).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn times_are_written_as_chrono_writes_rfc3339_with_microseconds() {
        let mut cases = vec![
            0i64,
            1,
            -1,
            999_999,
            1_764_601_445_123_456,
            951_782_400_000_000,   // 2000-02-29
            4_107_542_400_000_000, // 2100-03-01
            253_402_300_799_999_999,
            253_402_300_800_000_000,
            -62_167_219_200_000_000,
            -62_167_219_200_000_001,
        ];
        // a day apart and a little more, across four centuries
        let mut t = -2_208_988_800_000_000i64; // 1900
        while t < 10_000_000_000_000_000 {
            cases.push(t);
            t += 86_400_000_000 * 37 + 3_723_000_001;
        }
        for us in cases {
            let mut b = Vec::new();
            rfc3339_micros(&mut b, us);
            let want = chrono::DateTime::from_timestamp_micros(us)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            assert_eq!(String::from_utf8(b).unwrap(), want, "{us}");
        }
        let mut b = Vec::new();
        rfc3339_micros(&mut b, i64::MAX);
        assert_eq!(b, b"infinity");
    }
}
