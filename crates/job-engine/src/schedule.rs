//! Recurring schedules: when a schedule fires, as UTC instants, with the daylight-saving and
//! misfire behaviour chosen per schedule.
//!
//! A schedule's recurrence is matched against *civil* (wall-clock) time in its IANA time
//! zone: `croner` finds the wall-clock times that match the cron pattern (evaluated on a
//! zone-less clock), and `jiff` says what each of them is in the zone: one instant, none (a
//! daylight-saving gap) or two (an overlap). The policy decides the rest, which is the only
//! logic here:
//! - gap: [`GapPolicy::Skip`] fires nothing; [`GapPolicy::Shift`] fires at the wall-clock time
//!   read with the offset in force before the change (02:30 in a 02:00->03:00 gap fires at
//!   03:30), as RFC 5545 does;
//! - overlap: [`OverlapPolicy::First`], [`OverlapPolicy::Last`] or [`OverlapPolicy::Both`]
//!   occurrences of the repeated wall-clock time.
//!
//! Occurrences the engine missed (its leader was down) follow the [`Misfire`] policy: one run
//! now, none, or the latest N.
//!
//! Recurrences are cron expressions (five fields, with croner's `L`, `W` and `#`) or business
//! cycles written as phrases that translate to one: `daily at 02:00`,
//! `weekly on monday at 09:30`, `monthly on day 1 at 02:00`, `monthly on the last day at 23:00`.

use chrono::{DateTime, NaiveDateTime, TimeZone as _, Utc};
use croner::Cron;
use sqlx::PgPool;

use crate::store::{self, Inserted, NewJob, Priority};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapPolicy {
    Skip,
    Shift,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverlapPolicy {
    First,
    Last,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Misfire {
    /// Missed occurrences fold into one run now.
    FireOnce,
    /// Missed occurrences are dropped; the next one fires on time.
    Skip,
    /// The latest N missed occurrences run now (oldest first).
    CatchUp(u32),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("recurrence {0:?}: {1}")]
    Recurrence(String, String),
    #[error("unknown time zone {0:?}")]
    TimeZone(String),
    #[error("{0}")]
    Policy(String),
}

impl GapPolicy {
    pub fn parse(s: &str) -> Result<Self, ScheduleError> {
        match s {
            "skip" => Ok(GapPolicy::Skip),
            "shift" => Ok(GapPolicy::Shift),
            _ => Err(ScheduleError::Policy(format!(
                "dst_gap must be skip or shift, not {s:?}"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GapPolicy::Skip => "skip",
            GapPolicy::Shift => "shift",
        }
    }
}

impl OverlapPolicy {
    pub fn parse(s: &str) -> Result<Self, ScheduleError> {
        match s {
            "first" => Ok(OverlapPolicy::First),
            "last" => Ok(OverlapPolicy::Last),
            "both" => Ok(OverlapPolicy::Both),
            _ => Err(ScheduleError::Policy(format!(
                "dst_overlap must be first, last or both, not {s:?}"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OverlapPolicy::First => "first",
            OverlapPolicy::Last => "last",
            OverlapPolicy::Both => "both",
        }
    }
}

impl Misfire {
    /// `fire_once`, `skip` or `catch_up` (with `max` >= 1).
    pub fn parse(s: &str, max: i32) -> Result<Self, ScheduleError> {
        match s {
            "fire_once" => Ok(Misfire::FireOnce),
            "skip" => Ok(Misfire::Skip),
            "catch_up" if max >= 1 => Ok(Misfire::CatchUp(max as u32)),
            "catch_up" => Err(ScheduleError::Policy(
                "catch_up needs catch_up_max of at least 1".into(),
            )),
            _ => Err(ScheduleError::Policy(format!(
                "misfire must be fire_once, skip or catch_up, not {s:?}"
            ))),
        }
    }

    /// The stored form: (policy, catch-up maximum).
    pub fn as_parts(self) -> (&'static str, i32) {
        match self {
            Misfire::FireOnce => ("fire_once", 1),
            Misfire::Skip => ("skip", 1),
            Misfire::CatchUp(n) => ("catch_up", n as i32),
        }
    }
}

/// A recurrence in one time zone, with its daylight-saving policy.
#[derive(Debug, Clone)]
pub struct Calendar {
    cron: Cron,
    zone: jiff::tz::TimeZone,
    gap: GapPolicy,
    overlap: OverlapPolicy,
}

/// Translates a business-cycle phrase to a cron expression; anything else is taken as cron.
pub fn to_cron(recurrence: &str) -> Result<String, ScheduleError> {
    let bad = |why: &str| ScheduleError::Recurrence(recurrence.to_owned(), why.to_owned());
    let words: Vec<String> = recurrence
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let at = |s: &str| -> Result<(u32, u32), ScheduleError> {
        let (h, m) = s.split_once(':').ok_or_else(|| bad("time must be HH:MM"))?;
        let (h, m) = (h.parse::<u32>(), m.parse::<u32>());
        match (h, m) {
            (Ok(h), Ok(m)) if h < 24 && m < 60 => Ok((h, m)),
            _ => Err(bad("time must be HH:MM, 00:00 to 23:59")),
        }
    };
    let day_of_week = |s: &str| -> Result<u32, ScheduleError> {
        const DAYS: [&str; 7] = [
            "sunday",
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
        ];
        DAYS.iter()
            .position(|d| *d == s)
            .map(|i| i as u32)
            .ok_or_else(|| bad("unknown day of the week"))
    };
    let cron = match w.as_slice() {
        ["daily", "at", t] => {
            let (h, m) = at(t)?;
            format!("{m} {h} * * *")
        }
        ["weekly", "on", d, "at", t] => {
            let (h, m) = at(t)?;
            format!("{m} {h} * * {}", day_of_week(d)?)
        }
        ["monthly", "on", "day", n, "at", t] => {
            let (h, m) = at(t)?;
            match n.parse::<u32>() {
                Ok(n) if (1..=31).contains(&n) => format!("{m} {h} {n} * *"),
                _ => return Err(bad("day of the month must be 1 to 31")),
            }
        }
        ["monthly", "on", "the", "last", "day", "at", t] => {
            let (h, m) = at(t)?;
            format!("{m} {h} L * *")
        }
        [first, ..] if ["daily", "weekly", "monthly"].contains(first) => {
            return Err(bad(
                "expected `daily at HH:MM`, `weekly on <day> at HH:MM`, `monthly on day N at HH:MM` or `monthly on the last day at HH:MM`",
            ))
        }
        _ => recurrence.trim().to_owned(),
    };
    Ok(cron)
}

impl Calendar {
    pub fn new(
        recurrence: &str,
        time_zone: &str,
        gap: GapPolicy,
        overlap: OverlapPolicy,
    ) -> Result<Self, ScheduleError> {
        let cron_text = to_cron(recurrence)?;
        let cron: Cron = cron_text.parse().map_err(|e: croner::errors::CronError| {
            ScheduleError::Recurrence(recurrence.to_owned(), e.to_string())
        })?;
        let zone = jiff::tz::TimeZone::get(time_zone)
            .map_err(|_| ScheduleError::TimeZone(time_zone.to_owned()))?;
        Ok(Calendar {
            cron,
            zone,
            gap,
            overlap,
        })
    }

    /// Every occurrence strictly after `after` and at or before `until`, in order, at most
    /// `limit` of them (the earliest).
    pub fn between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        if until <= after || limit == 0 {
            return Vec::new();
        }
        // Wall-clock times and instants are not in the same order around an overlap (and a
        // shifted gap time lands after the gap), so scan wall-clock times from a day before
        // `after` to a day after `until` and keep the instants in range.
        let margin = chrono::Duration::days(1);
        let Some(mut civil) = self.civil(after).map(|c| c - margin) else {
            return Vec::new();
        };
        let Some(last_civil) = self.civil(until).map(|c| c + margin) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        // one bound for the scan itself: wall-clock matches visited
        let mut budget = limit.saturating_mul(4).saturating_add(10_000);
        while budget > 0 {
            budget -= 1;
            let floating = Utc.from_utc_datetime(&civil);
            let Ok(next) = self.cron.find_next_occurrence(&floating, false) else {
                break;
            };
            civil = next.naive_utc();
            if civil > last_civil {
                break;
            }
            for instant in self.resolve(civil) {
                if instant > after && instant <= until {
                    out.push(instant);
                }
            }
        }
        out.sort();
        out.dedup();
        out.truncate(limit);
        out
    }

    /// The wall-clock time in this zone at `instant`.
    fn civil(&self, instant: DateTime<Utc>) -> Option<NaiveDateTime> {
        let ts = to_jiff(instant)?;
        let dt = self.zone.to_datetime(ts);
        chrono::NaiveDate::from_ymd_opt(dt.year().into(), dt.month() as u32, dt.day() as u32)?
            .and_hms_nano_opt(
                dt.hour() as u32,
                dt.minute() as u32,
                dt.second() as u32,
                dt.subsec_nanosecond() as u32,
            )
    }

    /// The instants a wall-clock time stands for under this calendar's policies.
    fn resolve(&self, civil: NaiveDateTime) -> Vec<DateTime<Utc>> {
        use chrono::{Datelike, Timelike};
        use jiff::tz::AmbiguousOffset;
        let Ok(dt) = jiff::civil::DateTime::new(
            civil.year() as i16,
            civil.month() as i8,
            civil.day() as i8,
            civil.hour() as i8,
            civil.minute() as i8,
            civil.second() as i8,
            0,
        ) else {
            return Vec::new();
        };
        let at = |offset: jiff::tz::Offset| offset.to_timestamp(dt).ok().and_then(from_jiff);
        let instants: Vec<Option<DateTime<Utc>>> =
            match self.zone.to_ambiguous_timestamp(dt).offset() {
                AmbiguousOffset::Unambiguous { offset } => vec![at(offset)],
                AmbiguousOffset::Gap { before, .. } => match self.gap {
                    GapPolicy::Skip => vec![],
                    GapPolicy::Shift => vec![at(before)],
                },
                AmbiguousOffset::Fold { before, after } => match self.overlap {
                    OverlapPolicy::First => vec![at(before)],
                    OverlapPolicy::Last => vec![at(after)],
                    OverlapPolicy::Both => vec![at(before), at(after)],
                },
            };
        instants.into_iter().flatten().collect()
    }
}

fn to_jiff(t: DateTime<Utc>) -> Option<jiff::Timestamp> {
    jiff::Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).ok()
}

fn from_jiff(t: jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32)
}

/// One job to write for a schedule: the occurrence it stands for (its identity) and when it
/// runs (later than the occurrence only for a misfire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    pub occurrence: DateTime<Utc>,
    pub run_at: DateTime<Utc>,
}

/// Occurrences looked at per materialisation, at most (a schedule every minute that was down
/// for two months is not replayed minute by minute: the misfire policy keeps the latest).
const SCAN_LIMIT: usize = 100_000;

/// What to write for a schedule whose occurrences up to `cursor` are written: the occurrences
/// in `(cursor, until]`, where those older than `now - grace` were missed and follow `misfire`.
/// The new cursor is `until`.
pub fn plan(
    calendar: &Calendar,
    cursor: DateTime<Utc>,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
    grace: chrono::Duration,
    misfire: Misfire,
) -> Vec<Firing> {
    let occurrences = calendar.between(cursor, until, SCAN_LIMIT);
    let missed_before = now - grace;
    let (missed, on_time): (Vec<_>, Vec<_>) =
        occurrences.into_iter().partition(|t| *t < missed_before);
    let replay: Vec<DateTime<Utc>> = match misfire {
        Misfire::Skip => Vec::new(),
        Misfire::FireOnce => missed.last().copied().into_iter().collect(),
        Misfire::CatchUp(n) => {
            let keep = (n as usize).min(missed.len());
            missed[missed.len() - keep..].to_vec()
        }
    };
    replay
        .into_iter()
        .map(|occurrence| Firing {
            occurrence,
            run_at: now,
        })
        .chain(on_time.into_iter().map(|t| Firing {
            occurrence: t,
            run_at: t,
        }))
        .collect()
}

/// A schedule as stored (`job_schedule`).
#[derive(
    Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, sqlx::FromRow, utoipa::ToSchema,
)]
pub struct Schedule {
    pub name: String,
    pub kind: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub priority: i16,
    pub max_attempts: i32,
    pub recurrence: String,
    pub time_zone: String,
    pub dst_gap: String,
    pub dst_overlap: String,
    pub misfire: String,
    pub catch_up_max: i32,
    pub paused: bool,
    pub cursor: DateTime<Utc>,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub updated_by: String,
    pub updated_at: DateTime<Utc>,
}

/// What an operator (or a binary, at start-up) sets; the rest is kept by the engine. Omitted
/// fields take their defaults (priority 2, 5 attempts, shift, first, fire once).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleDef {
    pub kind: String,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    #[serde(default = "default_priority")]
    pub priority: i16,
    #[serde(default = "default_attempts")]
    pub max_attempts: i32,
    /// A cron expression or a business cycle (`monthly on day 1 at 02:00`).
    pub recurrence: String,
    /// IANA time zone the recurrence is read in.
    pub time_zone: String,
    /// skip or shift
    #[serde(default = "default_gap")]
    pub dst_gap: String,
    /// first, last or both
    #[serde(default = "default_overlap")]
    pub dst_overlap: String,
    /// fire_once, skip or catch_up
    #[serde(default = "default_misfire")]
    pub misfire: String,
    #[serde(default = "default_catch_up")]
    pub catch_up_max: i32,
    #[serde(default)]
    pub paused: bool,
}

fn empty_object() -> serde_json::Value {
    serde_json::json!({})
}
fn default_priority() -> i16 {
    2
}
fn default_attempts() -> i32 {
    5
}
fn default_gap() -> String {
    GapPolicy::Shift.as_str().into()
}
fn default_overlap() -> String {
    OverlapPolicy::First.as_str().into()
}
fn default_misfire() -> String {
    Misfire::FireOnce.as_parts().0.into()
}
fn default_catch_up() -> i32 {
    1
}

impl ScheduleDef {
    /// A definition with every policy at its default.
    pub fn new(kind: &str, recurrence: &str, time_zone: &str) -> Self {
        ScheduleDef {
            kind: kind.into(),
            payload: empty_object(),
            priority: default_priority(),
            max_attempts: default_attempts(),
            recurrence: recurrence.into(),
            time_zone: time_zone.into(),
            dst_gap: default_gap(),
            dst_overlap: default_overlap(),
            misfire: default_misfire(),
            catch_up_max: default_catch_up(),
            paused: false,
        }
    }
}

impl ScheduleDef {
    /// The calendar and misfire policy, or what is wrong with them.
    pub fn check(&self) -> Result<(Calendar, Misfire), ScheduleError> {
        let policy = |what: &str| Err(ScheduleError::Policy(what.into()));
        if !(0..=2).contains(&self.priority) {
            return policy("priority must be 0, 1 or 2");
        }
        if !(1..=1000).contains(&self.max_attempts) {
            return policy("max_attempts must be 1 to 1000");
        }
        if !(1..=10_000).contains(&self.catch_up_max) {
            return policy("catch_up_max must be 1 to 10000");
        }
        if has_nul(&self.payload)
            || [&self.recurrence, &self.time_zone]
                .iter()
                .any(|s| s.contains('\0'))
        {
            return policy("payload, recurrence and time_zone must not contain NUL characters");
        }
        let calendar = Calendar::new(
            &self.recurrence,
            &self.time_zone,
            GapPolicy::parse(&self.dst_gap)?,
            OverlapPolicy::parse(&self.dst_overlap)?,
        )?;
        Ok((calendar, Misfire::parse(&self.misfire, self.catch_up_max)?))
    }
}

/// Whether a JSON value holds a NUL character anywhere (Postgres' text and jsonb cannot).
pub fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

impl Schedule {
    pub fn def(&self) -> ScheduleDef {
        ScheduleDef {
            kind: self.kind.clone(),
            payload: self.payload.clone(),
            priority: self.priority,
            max_attempts: self.max_attempts,
            recurrence: self.recurrence.clone(),
            time_zone: self.time_zone.clone(),
            dst_gap: self.dst_gap.clone(),
            dst_overlap: self.dst_overlap.clone(),
            misfire: self.misfire.clone(),
            catch_up_max: self.catch_up_max,
            paused: self.paused,
        }
    }
}

/// Whether [`put`] created the schedule or changed an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    Updated,
    /// `only_if_absent` and it existed: nothing changed (an operator's edits win over defaults).
    Kept,
}

/// Creates or replaces a schedule's definition after checking it. A new schedule fires from
/// `now` on; an edited one keeps its cursor (nothing already written is written again).
pub async fn put(
    pool: &PgPool,
    name: &str,
    def: &ScheduleDef,
    by: &str,
    now: DateTime<Utc>,
    only_if_absent: bool,
) -> Result<Result<Put, ScheduleError>, sqlx::Error> {
    if let Err(e) = def.check() {
        return Ok(Err(e));
    }
    let conflict = if only_if_absent {
        "DO NOTHING"
    } else {
        "DO UPDATE SET kind = EXCLUDED.kind, payload = EXCLUDED.payload,
             priority = EXCLUDED.priority, max_attempts = EXCLUDED.max_attempts,
             recurrence = EXCLUDED.recurrence, time_zone = EXCLUDED.time_zone,
             dst_gap = EXCLUDED.dst_gap, dst_overlap = EXCLUDED.dst_overlap,
             misfire = EXCLUDED.misfire, catch_up_max = EXCLUDED.catch_up_max,
             paused = EXCLUDED.paused, updated_by = EXCLUDED.updated_by, updated_at = now()"
    };
    let created: Option<bool> = sqlx::query_scalar(&format!(
        "INSERT INTO job_schedule (name, kind, payload, priority, max_attempts, recurrence,
             time_zone, dst_gap, dst_overlap, misfire, catch_up_max, paused, cursor, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
         ON CONFLICT (name) {conflict}
         RETURNING (xmax = 0)"
    ))
    .bind(name)
    .bind(&def.kind)
    .bind(&def.payload)
    .bind(def.priority)
    .bind(def.max_attempts)
    .bind(&def.recurrence)
    .bind(&def.time_zone)
    .bind(&def.dst_gap)
    .bind(&def.dst_overlap)
    .bind(&def.misfire)
    .bind(def.catch_up_max)
    .bind(def.paused)
    .bind(now)
    .bind(by)
    .fetch_optional(pool)
    .await?;
    Ok(Ok(match created {
        Some(true) => Put::Created,
        Some(false) => Put::Updated,
        None => Put::Kept,
    }))
}

pub async fn list(pool: &PgPool) -> Result<Vec<Schedule>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM job_schedule ORDER BY name")
        .fetch_all(pool)
        .await
}

pub async fn get(pool: &PgPool, name: &str) -> Result<Option<Schedule>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM job_schedule WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
}

/// Removes a schedule; its jobs already written stay. Returns whether it existed.
pub async fn delete(pool: &PgPool, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM job_schedule WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes the jobs of every unpaused schedule's occurrences up to `until` (the leader calls
/// this each maintenance round, ahead of time, so occurrences fire from the engine's timer
/// on time). Occurrences older than `now - grace` were missed and follow the schedule's
/// misfire policy. Each schedule is one transaction: its jobs and its new cursor commit
/// together, and a dedupe key per occurrence makes a repeat write nothing. With a `fence` (the
/// leader's lease and its length), each transaction first holds the lease
/// ([`crate::leader::hold`]) and writes nothing once another leader has taken over. Returns
/// the jobs written.
pub async fn materialize(
    pool: &PgPool,
    now: DateTime<Utc>,
    until: DateTime<Utc>,
    grace: chrono::Duration,
    fence: Option<(&crate::leader::Fence, std::time::Duration)>,
) -> Result<u64, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM job_schedule WHERE NOT paused AND cursor < $1 ORDER BY name",
    )
    .bind(until)
    .fetch_all(pool)
    .await?;
    let mut written = 0;
    for name in names {
        let mut tx = pool.begin().await?;
        // a leader that was replaced (it paused past its lease) writes no occurrence: its
        // successor's cursor and jobs stand
        if let Some((fence, lease)) = fence {
            if !crate::leader::hold(&mut tx, fence, lease).await? {
                tracing::warn!(
                    epoch = fence.epoch,
                    "no longer the leader: schedules left to the new one"
                );
                return Ok(written);
            }
        }
        let row: Option<Schedule> = sqlx::query_as(
            "SELECT * FROM job_schedule WHERE name = $1 AND NOT paused AND cursor < $2
             FOR UPDATE SKIP LOCKED",
        )
        .bind(&name)
        .bind(until)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { continue };
        let (calendar, misfire) = match row.def().check() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(schedule = %name, error = %e, "schedule is invalid; not firing it");
                continue;
            }
        };
        let firings = plan(&calendar, row.cursor, now, until, grace, misfire);
        let priority = match row.priority {
            0 => Priority::P0,
            1 => Priority::P1,
            _ => Priority::P2,
        };
        for f in &firings {
            let mut payload = row.payload.clone();
            if let Some(obj) = payload.as_object_mut() {
                obj.insert("schedule".into(), name.clone().into());
                obj.insert("occurrence".into(), f.occurrence.to_rfc3339().into());
            }
            let job = NewJob {
                kind: row.kind.clone(),
                payload,
                priority,
                run_at: f.run_at.into(),
                max_attempts: row.max_attempts,
                dedupe_key: Some(format!("schedule:{name}:{}", f.occurrence.to_rfc3339())),
            };
            if let Inserted::New(_) = store::insert(&mut tx, &job).await? {
                written += 1;
            }
        }
        let last = firings.iter().map(|f| f.occurrence).max();
        sqlx::query(
            "UPDATE job_schedule SET cursor = $2,
                 last_fired_at = COALESCE($3, last_fired_at)
             WHERE name = $1",
        )
        .bind(&name)
        .bind(until)
        .bind(last)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let missed = firings.iter().filter(|f| f.run_at != f.occurrence).count();
        if missed > 0 {
            tracing::warn!(schedule = %name, replayed = missed, policy = %row.misfire, "schedule had missed occurrences");
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn cal(rec: &str, tz: &str, gap: GapPolicy, overlap: OverlapPolicy) -> Calendar {
        Calendar::new(rec, tz, gap, overlap).unwrap()
    }

    #[test]
    fn new_york_spring_gap_and_autumn_overlap_follow_the_policy() {
        // 2026-03-08: 02:00 EST -> 03:00 EDT; 2026-11-01: 02:00 EDT -> 01:00 EST
        let spring = |gap| {
            cal("30 2 * * *", "America/New_York", gap, OverlapPolicy::First).between(
                utc("2026-03-07T12:00:00Z"),
                utc("2026-03-09T12:00:00Z"),
                10,
            )
        };
        assert_eq!(
            spring(GapPolicy::Skip),
            vec![utc("2026-03-09T06:30:00Z")],
            "no 02:30 on the 8th"
        );
        assert_eq!(
            spring(GapPolicy::Shift),
            vec![utc("2026-03-08T07:30:00Z"), utc("2026-03-09T06:30:00Z")],
            "02:30 read with EST is 03:30 EDT"
        );
        let autumn = |overlap| {
            cal("30 1 * * *", "America/New_York", GapPolicy::Shift, overlap).between(
                utc("2026-11-01T00:00:00Z"),
                utc("2026-11-01T12:00:00Z"),
                10,
            )
        };
        assert_eq!(
            autumn(OverlapPolicy::First),
            vec![utc("2026-11-01T05:30:00Z")]
        );
        assert_eq!(
            autumn(OverlapPolicy::Last),
            vec![utc("2026-11-01T06:30:00Z")]
        );
        assert_eq!(
            autumn(OverlapPolicy::Both),
            vec![utc("2026-11-01T05:30:00Z"), utc("2026-11-01T06:30:00Z")]
        );
    }

    #[test]
    fn business_cycles_translate_to_cron_and_bad_ones_are_refused() {
        let cases = [
            ("daily at 02:00", "0 2 * * *"),
            ("weekly on Monday at 09:30", "30 9 * * 1"),
            ("monthly on day 1 at 02:00", "0 2 1 * *"),
            ("monthly on the last day at 23:05", "5 23 L * *"),
            ("*/5 * * * *", "*/5 * * * *"),
        ];
        for (phrase, cron) in cases {
            assert_eq!(to_cron(phrase).unwrap(), cron, "{phrase}");
        }
        for bad in [
            "daily at 24:00",
            "monthly on day 32 at 02:00",
            "weekly on someday at 01:00",
            "monthly at 02:00",
        ] {
            assert!(to_cron(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            Calendar::new("61 * * * *", "UTC", GapPolicy::Skip, OverlapPolicy::First),
            Err(ScheduleError::Recurrence(..))
        ));
        assert_eq!(
            Calendar::new(
                "0 2 * * *",
                "Mars/Olympus",
                GapPolicy::Skip,
                OverlapPolicy::First
            )
            .err(),
            Some(ScheduleError::TimeZone("Mars/Olympus".into()))
        );
    }

    #[test]
    fn misfires_fire_once_skip_or_catch_up_the_latest_n() {
        let c = cal("0 * * * *", "UTC", GapPolicy::Skip, OverlapPolicy::First);
        // down from 00:30 to 05:10: 01:00 .. 05:00 missed; 06:00 is within the horizon
        let (cursor, now, until) = (
            utc("2026-01-01T00:30:00Z"),
            utc("2026-01-01T05:10:00Z"),
            utc("2026-01-01T06:00:00Z"),
        );
        let grace = chrono::Duration::minutes(1);
        let runs = |m| {
            plan(&c, cursor, now, until, grace, m)
                .into_iter()
                .map(|f| (f.occurrence.format("%H").to_string(), f.run_at == now))
                .collect::<Vec<_>>()
        };
        let h = |s: &str, replay: bool| (s.to_owned(), replay);
        assert_eq!(runs(Misfire::Skip), vec![h("06", false)]);
        assert_eq!(runs(Misfire::FireOnce), vec![h("05", true), h("06", false)]);
        assert_eq!(
            runs(Misfire::CatchUp(2)),
            vec![h("04", true), h("05", true), h("06", false)]
        );
        assert_eq!(runs(Misfire::CatchUp(9)).len(), 6);
    }
}
