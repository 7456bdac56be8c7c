//! The report: the paper's figures beside ours, one row each, with the SLA and pass/fail; on
//! the terminal, as JSON and as one self-contained HTML page with its charts drawn as inline
//! SVG (no script, nothing fetched).

use std::fmt::Write as _;

use serde::Serialize;

use super::collect::{Dist, ServerFigures};

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: String,
    pub paper: String,
    pub ours: String,
    pub sla: String,
    /// `None`: no SLA to pass or fail (shown for comparison).
    pub pass: Option<bool>,
}

/// One second of the run (by intended send time), for the charts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Second {
    pub t: u64,
    pub offered: u64,
    pub created: u64,
    pub refused: u64,
    pub unknown: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// A fault as it ran.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRun {
    pub kind: &'static str,
    pub target: String,
    pub at_s: f64,
    pub end_s: f64,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientFigures {
    pub offered: u64,
    pub offered_rate: f64,
    pub created: u64,
    pub created_rate: f64,
    pub answered_rate: f64,
    pub refused: std::collections::BTreeMap<String, u64>,
    pub unknown: u64,
    pub retries: u64,
    pub calm: Dist,
    pub chaos: Dist,
    pub whole: Dist,
    /// First tries answered later than 150 ms after their intended time, or never.
    pub over_150ms: f64,
    /// order-api's `prelock_calls_total{outcome="timeout"}` over all its pre-lock calls.
    pub prelock_timeout_rate: Option<f64>,
}

fn ms(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} s", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn pct(v: f64) -> String {
    if v == 0.0 {
        "0 %".to_owned()
    } else if v < 0.0001 {
        format!("{:.4} %", v * 100.0)
    } else {
        format!("{:.3} %", v * 100.0)
    }
}

fn dist4(d: &Dist) -> String {
    if d.count == 0 {
        return "n/a".to_owned();
    }
    format!(
        "{} / {} / {} / {}",
        ms(d.p50_ms),
        ms(d.p99_ms),
        ms(d.p999_ms),
        ms(d.max_ms)
    )
}

pub fn rows(
    c: &ClientFigures,
    s: &ServerFigures,
    anomalies: usize,
    unplanned_exits: usize,
    chaos: bool,
) -> Vec<Row> {
    let row = |figure: &str, paper: &str, ours: String, sla: &str, pass: Option<bool>| Row {
        figure: figure.to_owned(),
        paper: paper.to_owned(),
        ours,
        sla: sla.to_owned(),
        pass,
    };
    let mut out = vec![
        row(
            "offered / achieved \"buy now\" rate",
            "2,400/s",
            format!(
                "{:.0}/s / {:.0}/s answered ({:.0}/s created)",
                c.offered_rate, c.answered_rate, c.created_rate
            ),
            "",
            None,
        ),
        row(
            "\"buy now\" p50 / p99 / p99.9 / max, calm",
            "p99 42 ms",
            dist4(&c.calm),
            "p99 <= 150 ms",
            (c.calm.count > 0).then_some(c.calm.p99_ms <= 150.0),
        ),
    ];
    if chaos {
        out.push(row(
            "\"buy now\" p50 / p99 / p99.9 / max, under chaos",
            "p99 68 ms",
            dist4(&c.chaos),
            "p99 <= 150 ms",
            (c.chaos.count > 0).then_some(c.chaos.p99_ms <= 150.0),
        ));
    }
    out.extend([
        row(
            "\"buy now\" later than 150 ms or unanswered",
            "",
            pct(c.over_150ms),
            "",
            None,
        ),
        row(
            "prelock_timeout_rate (order-api's pre-lock calls)",
            "",
            c.prelock_timeout_rate.map_or("n/a".to_owned(), pct),
            "< 0.02 %",
            c.prelock_timeout_rate.map(|r| r < 0.0002),
        ),
        row(
            "compensation: first attempt failed",
            "12.7 %",
            format!(
                "{} of {} checked",
                pct(s.first_attempt_failed),
                s.checked_payments
            ),
            "",
            None,
        ),
        row(
            "compensation: resolved within 3 retries",
            "99.983 %",
            pct(s.within_3_retries),
            "",
            None,
        ),
        row(
            "compensation: still failing after 5 retries",
            "0.0021 %",
            pct(s.failing_after_5),
            "",
            None,
        ),
        row(
            "compensation_success_rate (paid at the provider: kept or refunded)",
            "",
            format!(
                "{} of {}",
                pct(s.compensation_success_rate),
                s.paid_at_provider
            ),
            "> 99.99 %",
            (s.paid_at_provider > 0).then_some(s.compensation_success_rate > 0.9999),
        ),
        row(
            "compensation execution p99 (a check: due to done)",
            "112 ms",
            if s.check_execution.count == 0 {
                "n/a".to_owned()
            } else {
                format!(
                    "{} ({} runs)",
                    ms(s.check_execution.p99_ms),
                    s.check_execution.count
                )
            },
            "",
            None,
        ),
        row(
            "\"provider says paid\" to PAID p50 / p99 / max",
            "completion p99 347 ms",
            if s.time_to_paid.count == 0 {
                "n/a".to_owned()
            } else {
                format!(
                    "{} / {} / {}",
                    ms(s.time_to_paid.p50_ms),
                    ms(s.time_to_paid.p99_ms),
                    ms(s.time_to_paid.max_ms)
                )
            },
            "max <= 90 s",
            (s.time_to_paid.count > 0).then_some(s.time_to_paid.max_ms <= 90_000.0),
        ),
        row(
            "  ... of those compensation made paid (p50 / p99 / max)",
            "",
            if s.time_to_paid_by_compensation.count == 0 {
                "none".to_owned()
            } else {
                format!(
                    "{} / {} / {} ({})",
                    ms(s.time_to_paid_by_compensation.p50_ms),
                    ms(s.time_to_paid_by_compensation.p99_ms),
                    ms(s.time_to_paid_by_compensation.max_ms),
                    s.time_to_paid_by_compensation.count
                )
            },
            "",
            None,
        ),
        row(
            "follow-up jobs: due to done p99 (bounds the fire delay)",
            "",
            if s.job_due_to_done.count == 0 {
                "n/a".to_owned()
            } else {
                format!("{} ({} jobs)", ms(s.job_due_to_done.p99_ms), s.jobs_done)
            },
            "p99 < 800 ms",
            (s.job_due_to_done.count > 0).then_some(s.job_due_to_done.p99_ms < 800.0),
        ),
        row(
            "follow-up jobs done within 100 ms of due",
            "",
            pct(s.jobs_on_time),
            ">= 99.95 %",
            (s.jobs_done > 0).then_some(s.jobs_on_time >= 0.9995),
        ),
        row(
            "outbox to Kafka lag p99 (written to read back by the checker)",
            "",
            if s.outbox_lag.count == 0 {
                "n/a".to_owned()
            } else {
                ms(s.outbox_lag.p99_ms)
            },
            "",
            None,
        ),
        row(
            "processes that died unplanned (started again, as a supervisor would)",
            "",
            unplanned_exits.to_string(),
            "0",
            Some(unplanned_exits == 0),
        ),
        row(
            "anomalies found by the checker",
            "",
            anomalies.to_string(),
            "0",
            Some(anomalies == 0),
        ),
    ]);
    out
}

pub fn table(rows: &[Row]) -> String {
    let w0 = rows
        .iter()
        .map(|r| r.figure.chars().count())
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .map(|r| r.paper.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let w2 = rows
        .iter()
        .map(|r| r.ours.chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let w3 = rows
        .iter()
        .map(|r| r.sla.chars().count())
        .max()
        .unwrap_or(0)
        .max(3);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  result",
        "figure", "paper", "ours", "SLA"
    );
    for r in rows {
        let result = match r.pass {
            Some(true) => "pass",
            Some(false) => "FAIL",
            None => "",
        };
        let _ = writeln!(
            s,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {result}",
            r.figure, r.paper, r.ours, r.sla
        );
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart: `series` of (name, colour, points), vertical `marks` (x, label), on a log
/// y axis when `log`.
fn chart(
    id: &str,
    title: &str,
    y_label: &str,
    series: &[(&str, &str, Vec<(f64, f64)>)],
    marks: &[(f64, f64, String)],
    log: bool,
) -> String {
    let (w, h, l, r, t, b) = (900.0, 280.0, 60.0, 20.0, 30.0, 40.0);
    let xs = series.iter().flat_map(|s| s.2.iter().map(|p| p.0));
    let x_max = xs.fold(1.0f64, f64::max);
    let ys = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let y_max = ys.fold(1.0f64, f64::max) * 1.1;
    let y_min = if log { 0.1f64 } else { 0.0 };
    let fy = |v: f64| {
        let v = v.max(y_min);
        let frac = if log {
            (v.log10() - y_min.log10()) / (y_max.log10() - y_min.log10())
        } else {
            v / y_max
        };
        t + (h - t - b) * (1.0 - frac.clamp(0.0, 1.0))
    };
    let fx = |v: f64| l + (w - l - r) * (v / x_max);
    let mut s = format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"{}\">",
        esc(title)
    );
    let _ = write!(
        s,
        "<text x=\"{l}\" y=\"18\" class=\"title\">{}</text>",
        esc(title)
    );
    let _ = write!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" class=\"axis\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" class=\"axis\"/>",
        h - b,
        w - r,
        h - b,
        h - b
    );
    // y ticks
    let ticks: Vec<f64> = if log {
        let mut v = Vec::new();
        let mut x = 1.0;
        while x <= y_max {
            v.push(x);
            x *= 10.0;
        }
        v
    } else {
        (0..=4).map(|i| y_max / 1.1 * i as f64 / 4.0).collect()
    };
    for v in ticks {
        let y = fy(v);
        let _ = write!(
            s,
            "<line x1=\"{l}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" class=\"grid\"/><text x=\"{}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>",
            w - r,
            l - 4.0,
            y + 4.0,
            if v >= 1000.0 { format!("{:.0}k", v / 1000.0) } else { format!("{v:.0}") }
        );
    }
    let _ = write!(
        s,
        "<text x=\"12\" y=\"{}\" class=\"tick\" transform=\"rotate(-90 12 {})\">{}</text><text x=\"{}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">seconds into the run</text>",
        h / 2.0,
        h / 2.0,
        esc(y_label),
        (w + l) / 2.0,
        h - 8.0
    );
    for (x0, x1, label) in marks {
        let (a, z) = (fx(*x0), fx(x1.max(*x0 + x_max / 300.0)));
        let _ = write!(
            s,
            "<rect x=\"{a:.1}\" y=\"{t}\" width=\"{:.1}\" height=\"{}\" class=\"fault\"><title>{}</title></rect><text x=\"{:.1}\" y=\"{}\" class=\"faultlabel\">{}</text>",
            (z - a).max(1.5),
            h - t - b,
            esc(label),
            a + 2.0,
            t + 10.0,
            esc(label)
        );
    }
    for (i, (name, colour, pts)) in series.iter().enumerate() {
        if pts.is_empty() {
            continue;
        }
        let mut d = String::new();
        for (j, (x, y)) in pts.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1}",
                if j == 0 { "M" } else { "L" },
                fx(*x),
                fy(*y)
            );
        }
        let _ = write!(
            s,
            "<path d=\"{d}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" class=\"series\" data-name=\"{}\"/><text x=\"{}\" y=\"{}\" fill=\"{colour}\" class=\"legend\">{}</text>",
            esc(name),
            w - r - 160.0,
            t + 14.0 * (i as f64 + 1.0),
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// A bar chart of (upper bound ms, count).
fn bars(id: &str, title: &str, buckets: &[(f64, u64)]) -> String {
    let used: Vec<&(f64, u64)> = if buckets.is_empty() {
        Vec::new()
    } else {
        let first = buckets.iter().position(|b| b.1 > 0).unwrap_or(0);
        let last = buckets.iter().rposition(|b| b.1 > 0).unwrap_or(0);
        buckets[first..=last.max(first)].iter().collect()
    };
    let (w, h, l, b) = (900.0, 260.0, 60.0, 40.0);
    let max = used.iter().map(|x| x.1).max().unwrap_or(1).max(1) as f64;
    let bw = (w - l - 20.0) / used.len().max(1) as f64;
    let mut s = format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"{}\"><text x=\"{l}\" y=\"18\" class=\"title\">{}</text>",
        esc(title),
        esc(title)
    );
    for (i, (bound, n)) in used.iter().enumerate() {
        let bh = (h - 30.0 - b) * (*n as f64 / max);
        let x = l + bw * i as f64;
        let label = if *bound >= 1000.0 {
            format!("{:.0}s", bound / 1000.0)
        } else {
            format!("{bound:.0}ms")
        };
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" class=\"bar\"><title>&lt;= {label}: {n}</title></rect><text x=\"{:.1}\" y=\"{}\" class=\"tick\" text-anchor=\"middle\">{label}</text>",
            x + 1.0,
            h - b - bh,
            (bw - 2.0).max(1.0),
            x + bw / 2.0,
            h - b + 14.0
        );
    }
    s.push_str("</svg>");
    s
}

pub fn html(
    rows: &[Row],
    seconds: &[Second],
    faults: &[FaultRun],
    chaos_from_s: Option<f64>,
    server: &ServerFigures,
    json: &serde_json::Value,
) -> String {
    let mut marks: Vec<(f64, f64, String)> = faults
        .iter()
        .map(|f| (f.at_s, f.end_s, format!("{} {}", f.kind, f.target)))
        .collect();
    if let Some(c) = chaos_from_s {
        marks.insert(0, (c, c, "chaos begins".to_owned()));
    }
    let pts = |f: &dyn Fn(&Second) -> f64| -> Vec<(f64, f64)> {
        seconds.iter().map(|s| (s.t as f64, f(s))).collect()
    };
    let latency = chart(
        "latency",
        "\"buy now\" latency per second (from the intended send time)",
        "ms (log)",
        &[
            ("p50", "#2b6cb0", pts(&|s| s.p50_ms)),
            ("p99", "#c53030", pts(&|s| s.p99_ms)),
        ],
        &marks,
        true,
    );
    let throughput = chart(
        "throughput",
        "\"buy now\" per second: offered, created, refused, unanswered",
        "requests/s",
        &[
            ("offered", "#718096", pts(&|s| s.offered as f64)),
            ("created (201)", "#2f855a", pts(&|s| s.created as f64)),
            ("refused", "#dd6b20", pts(&|s| s.refused as f64)),
            ("unanswered", "#c53030", pts(&|s| s.unknown as f64)),
        ],
        &marks,
        false,
    );
    let paid = bars(
        "time-to-paid",
        "\"provider says paid\" to PAID (count per power-of-two bucket)",
        &server.time_to_paid_buckets,
    );
    let mut table = String::from(
        "<table id=\"figures\"><thead><tr><th>figure</th><th>paper</th><th>ours</th><th>SLA</th><th>result</th></tr></thead><tbody>",
    );
    for r in rows {
        let (class, result) = match r.pass {
            Some(true) => ("pass", "pass"),
            Some(false) => ("fail", "FAIL"),
            None => ("", ""),
        };
        let _ = write!(
            table,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{result}</td></tr>",
            esc(&r.figure),
            esc(&r.paper),
            esc(&r.ours),
            esc(&r.sla)
        );
    }
    table.push_str("</tbody></table>");
    let mut fault_list = String::from("<ol id=\"faults\">");
    for f in faults {
        let _ = write!(
            fault_list,
            "<li>{:.1} s to {:.1} s: {} {} {}</li>",
            f.at_s,
            f.end_s,
            esc(f.kind),
            esc(&f.target),
            if f.ok {
                String::new()
            } else {
                format!("(failed: {})", esc(&f.detail))
            }
        );
    }
    fault_list.push_str("</ol>");
    let raw = esc(&serde_json::to_string_pretty(json).unwrap_or_default());
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>bar-fulfillment scenario report</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1a202c;max-width:960px}}
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #e2e8f0;padding:4px 8px;text-align:left}}
tr.pass td:last-child{{color:#2f855a;font-weight:600}}tr.fail td:last-child{{color:#c53030;font-weight:700}}
.chart{{width:100%;height:auto;margin:16px 0;background:#fff}}.axis{{stroke:#4a5568}}.grid{{stroke:#edf2f7}}
.tick{{font-size:11px;fill:#4a5568}}.title{{font-size:13px;font-weight:600}}.legend{{font-size:12px}}
.fault{{fill:#feb2b2;opacity:.45}}.faultlabel{{font-size:9px;fill:#9b2c2c}}.bar{{fill:#4299e1}}
details pre{{font-size:11px;overflow:auto;max-height:400px}}
</style></head><body>
<h1>bar-fulfillment: the paper's stress test</h1>
<h2>Figures</h2>{table}
<h2>Where the system bent</h2>{latency}{throughput}{paid}
<h2>Faults, as they ran</h2>{fault_list}
<details><summary>Everything (the JSON report)</summary><pre>{raw}</pre></details>
</body></html>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_html_page_carries_its_charts_and_escapes_what_it_shows() {
        let rows = vec![Row {
            figure: "<script>".into(),
            paper: "1".into(),
            ours: "2".into(),
            sla: "".into(),
            pass: Some(false),
        }];
        let secs: Vec<Second> = (0..10)
            .map(|t| Second {
                t,
                offered: 10,
                created: 9,
                p50_ms: 5.0,
                p99_ms: 50.0,
                ..Default::default()
            })
            .collect();
        let page = html(
            &rows,
            &secs,
            &[],
            Some(3.0),
            &ServerFigures::default(),
            &serde_json::json!({}),
        );
        assert!(!page.contains("<script>"));
        for id in ["latency", "throughput", "time-to-paid", "figures"] {
            assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert!(page.contains("chaos begins"));
    }
}
