//! The schedule calculator against a reference computed independently here.
//!
//! The reference never asks "what instant is this wall-clock time" (the question the
//! calculator answers with its policies). It walks every UTC minute of a window, reads the
//! wall clock there (UTC -> local is never ambiguous), matches the pattern with its own
//! matcher, and derives each policy from what it saw: a wall-clock time seen twice is an
//! overlap (first, last or both), one never seen is a gap (skipped, or read with the offset of
//! the day before: shifted). Windows sit around the daylight-saving changes of
//! America/New_York and Europe/Berlin in 2024 to 2031. Asia/Shanghai business cycles are
//! checked against calendar arithmetic at the fixed UTC+8.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use job_engine::schedule::{Calendar, GapPolicy, OverlapPolicy};
use proptest::prelude::*;
use std::collections::BTreeMap;

const ZONES: [&str; 2] = ["America/New_York", "Europe/Berlin"];

fn local_of(zone: &jiff::tz::TimeZone, t: DateTime<Utc>) -> (NaiveDateTime, i64) {
    let ts = jiff::Timestamp::from_second(t.timestamp()).unwrap();
    let offset = zone.to_offset(ts).seconds() as i64;
    (t.naive_utc() + Duration::seconds(offset), offset)
}

/// Occurrences of "at `minute` past `hour` [on day `dom`]" in `(after, until]`, by the reference.
/// `(minute, hour, day of month)`, the pattern's fields the reference matches.
type Fields = (u32, u32, Option<u32>);

fn reference(
    zone_name: &str,
    (minute, hour, dom): Fields,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
    gap: GapPolicy,
    overlap: OverlapPolicy,
) -> Vec<DateTime<Utc>> {
    let zone = jiff::tz::TimeZone::get(zone_name).unwrap();
    let matches = |c: &NaiveDateTime| {
        c.minute() == minute && c.hour() == hour && dom.is_none_or(|d| c.day() == d)
    };
    // every instant whose wall clock matches, grouped by that wall-clock time
    let mut seen: BTreeMap<NaiveDateTime, Vec<DateTime<Utc>>> = BTreeMap::new();
    let mut t = after + Duration::minutes(1);
    while t <= until {
        let (civil, _) = local_of(&zone, t);
        if matches(&civil) {
            seen.entry(civil).or_default().push(t);
        }
        t += Duration::minutes(1);
    }
    let mut out = Vec::new();
    for instants in seen.values() {
        match (instants.len(), overlap) {
            (1, _) => out.push(instants[0]),
            (_, OverlapPolicy::First) => out.push(instants[0]),
            (_, OverlapPolicy::Last) => out.push(*instants.last().unwrap()),
            (_, OverlapPolicy::Both) => out.extend(instants.iter().copied()),
        }
    }
    // wall-clock times that should have occurred in the window but never did: the gap
    if gap == GapPolicy::Shift {
        let (first_day, _) = local_of(&zone, after);
        let (last_day, _) = local_of(&zone, until);
        let mut day = first_day.date();
        while day <= last_day.date() {
            let civil = day.and_hms_opt(hour, minute, 0).unwrap();
            if matches(&civil) && !seen.contains_key(&civil) {
                // the offset in force a day earlier is the one before the change
                let (_, before) =
                    local_of(&zone, Utc.from_utc_datetime(&civil) - Duration::days(1));
                let shifted = Utc.from_utc_datetime(&civil) - Duration::seconds(before);
                if shifted > after && shifted <= until {
                    out.push(shifted);
                }
            }
            day = day.succ_opt().unwrap();
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The day of the change by the rules in force since 2007: the US springs forward on the second
/// Sunday of March and falls back on the first Sunday of November; the EU changes on the last
/// Sundays of March and October.
fn change_day(zone_name: &str, year: i32, autumn: bool) -> NaiveDate {
    let sunday = |month: u32, nth: u8| {
        NaiveDate::from_weekday_of_month_opt(year, month, chrono::Weekday::Sun, nth).unwrap()
    };
    let last_sunday = |month: u32| {
        NaiveDate::from_weekday_of_month_opt(year, month, chrono::Weekday::Sun, 5)
            .unwrap_or_else(|| sunday(month, 4))
    };
    match (zone_name, autumn) {
        ("America/New_York", false) => sunday(3, 2),
        ("America/New_York", true) => sunday(11, 1),
        (_, false) => last_sunday(3),
        (_, true) => last_sunday(10),
    }
}

fn noon(zone_name: &str, date: NaiveDate) -> DateTime<Utc> {
    // noon local is far from any change (they happen at night): one offset, no ambiguity
    let zone = jiff::tz::TimeZone::get(zone_name).unwrap();
    let civil = date.and_hms_opt(12, 0, 0).unwrap();
    let guess = Utc.from_utc_datetime(&civil);
    let (_, offset) = local_of(&zone, guess);
    guess - Duration::seconds(offset)
}

fn policies() -> impl Strategy<Value = (GapPolicy, OverlapPolicy)> {
    (
        prop_oneof![Just(GapPolicy::Skip), Just(GapPolicy::Shift)],
        prop_oneof![
            Just(OverlapPolicy::First),
            Just(OverlapPolicy::Last),
            Just(OverlapPolicy::Both)
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Daily and monthly patterns over windows that straddle a spring or an autumn change
    /// (found by the rule, not by the time-zone database), hours weighted to the night.
    #[test]
    fn around_daylight_saving_changes_every_policy_matches_the_reference(
        zone in 0usize..2,
        year in 2024i32..=2031,
        autumn in any::<bool>(),
        days_before in 1i64..6,
        days_after in 1i64..6,
        hour in prop_oneof![3 => 0u32..4, 1 => 0u32..24],
        minute in prop_oneof![Just(0u32), Just(30), 0u32..60],
        monthly in any::<bool>(),
        (gap, overlap) in policies(),
    ) {
        let zone_name = ZONES[zone];
        let change = change_day(zone_name, year, autumn);
        let (first, last) = (change - Duration::days(days_before), change + Duration::days(days_after));
        let (after, until) = (noon(zone_name, first), noon(zone_name, last));
        let dom = monthly.then(|| change.day());
        let pattern = match dom {
            Some(d) => format!("{minute} {hour} {d} * *"),
            None => format!("{minute} {hour} * * *"),
        };
        let calendar = Calendar::new(&pattern, zone_name, gap, overlap).unwrap();
        let got = calendar.between(after, until, 10_000);
        let want = reference(zone_name, (minute, hour, dom), after, until, gap, overlap);
        prop_assert_eq!(got, want, "{} in {} from {} to {}, {:?} {:?}", pattern, zone_name, after, until, gap, overlap);
    }
}

#[test]
fn a_whole_year_at_the_changing_hours_in_both_zones_under_every_policy() {
    for zone_name in ZONES {
        for pattern_hour in [1u32, 2] {
            for gap in [GapPolicy::Skip, GapPolicy::Shift] {
                for overlap in [
                    OverlapPolicy::First,
                    OverlapPolicy::Last,
                    OverlapPolicy::Both,
                ] {
                    let (after, until) = (
                        noon(zone_name, NaiveDate::from_ymd_opt(2026, 1, 1).unwrap()),
                        noon(zone_name, NaiveDate::from_ymd_opt(2027, 1, 1).unwrap()),
                    );
                    let pattern = format!("30 {pattern_hour} * * *");
                    let got = Calendar::new(&pattern, zone_name, gap, overlap)
                        .unwrap()
                        .between(after, until, 10_000);
                    let want = reference(
                        zone_name,
                        (30, pattern_hour, None),
                        after,
                        until,
                        gap,
                        overlap,
                    );
                    assert_eq!(got, want, "{pattern} {zone_name} {gap:?} {overlap:?}");
                    // and the reference did see a change: 365 days give 364 to 366 firings
                    assert!((364..=366).contains(&want.len()), "{}", want.len());
                }
            }
        }
    }
}

#[test]
fn shanghai_business_cycles_over_seven_years_match_calendar_arithmetic() {
    let plus8 = |d: NaiveDate, h: u32, m: u32| {
        Utc.from_utc_datetime(&d.and_hms_opt(h, m, 0).unwrap()) - Duration::hours(8)
    };
    let (from, to) = (
        NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
        NaiveDate::from_ymd_opt(2030, 12, 31).unwrap(),
    );
    let (after, until) = (plus8(from, 0, 0), plus8(to, 23, 59));
    let days: Vec<NaiveDate> = from.iter_days().take_while(|d| *d <= to).collect();
    let cases: [(&str, Box<dyn Fn(&NaiveDate) -> bool>, u32, u32); 3] = [
        (
            "monthly on day 1 at 02:00",
            Box::new(|d| d.day() == 1),
            2,
            0,
        ),
        (
            "monthly on the last day at 23:30",
            Box::new(|d| d.succ_opt().unwrap().day() == 1),
            23,
            30,
        ),
        (
            "weekly on monday at 09:15",
            Box::new(|d| d.weekday() == chrono::Weekday::Mon),
            9,
            15,
        ),
    ];
    for (phrase, on, h, m) in cases {
        let want: Vec<DateTime<Utc>> = days
            .iter()
            .filter(|d| on(d))
            .map(|d| plus8(*d, h, m))
            .collect();
        for (gap, overlap) in [
            (GapPolicy::Skip, OverlapPolicy::First),
            (GapPolicy::Shift, OverlapPolicy::Both),
        ] {
            let got = Calendar::new(phrase, "Asia/Shanghai", gap, overlap)
                .unwrap()
                .between(after, until, 100_000);
            assert_eq!(got, want, "{phrase}");
        }
    }
}
