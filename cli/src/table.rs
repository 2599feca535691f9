//! Tables and the small formats inside them. Every table fits 80 columns (comfy-table wraps
//! cells to fit) and leaves out columns with nothing to say, like pueue's table builder.
//! Pure functions only: the commands fetch, this module turns values into text.

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Table};

/// The width every table is fitted to.
pub const WIDTH: u16 = 80;

/// When a column may be left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hide {
    /// Always shown.
    Never,
    /// Left out when every cell is empty.
    WhenBlank,
    /// Left out when every cell is empty or "0" (counters that are usually zero).
    WhenZero,
}

/// One column: its header, alignment and when to leave it out.
#[derive(Debug, Clone, Copy)]
pub struct Col {
    pub header: &'static str,
    pub right: bool,
    pub hide: Hide,
    /// May wrap onto several lines to fit; ids, numbers and addresses never do.
    pub wrap: bool,
}

impl Col {
    /// A left-aligned text column that is always shown.
    pub const fn text(header: &'static str) -> Self {
        Col { header, right: false, hide: Hide::Never, wrap: false }
    }

    /// A right-aligned number column that is always shown.
    pub const fn num(header: &'static str) -> Self {
        Col { header, right: true, hide: Hide::Never, wrap: false }
    }

    /// The same column, left out under `hide`.
    pub const fn hide(self, hide: Hide) -> Self {
        Col { hide, ..self }
    }

    /// The same column, allowed to wrap: free text such as user ids, channel lists, payloads.
    pub const fn wrap(self) -> Self {
        Col { wrap: true, ..self }
    }
}

/// Builds a borderless table of `rows` (one `String` per column) fitted to [`WIDTH`] by
/// wrapping the `wrap` columns, and renders it without trailing spaces. Columns are two spaces
/// apart.
pub fn render(cols: &[Col], rows: &[Vec<String>]) -> String {
    let keep: Vec<usize> = (0..cols.len())
        .filter(|&i| {
            let blank = |zero_too: bool| rows.iter().all(|r| r[i].is_empty() || (zero_too && r[i] == "0"));
            match cols[i].hide {
                Hide::Never => true,
                Hide::WhenBlank => !blank(false),
                Hide::WhenZero => !blank(true),
            }
        })
        .collect();
    let mut table = Table::new();
    table
        .load_style(NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(WIDTH)
        .set_header(keep.iter().map(|&i| cols[i].header).collect::<Vec<_>>());
    for row in rows {
        table.add_row(keep.iter().map(|&i| row[i].as_str()).collect::<Vec<_>>());
    }
    let last = keep.len().saturating_sub(1);
    for (pos, &i) in keep.iter().enumerate() {
        if let Some(column) = table.column_mut(pos) {
            column.set_padding((0, if pos == last { 0 } else { 2 }));
            if cols[i].right {
                column.set_cell_alignment(CellAlignment::Right);
            }
            if !cols[i].wrap {
                column.set_constraint(ColumnConstraint::ContentWidth);
            }
        }
    }
    table.trim_fmt()
}

/// A span of seconds as an operator reads it: `42s`, `5m12s`, `3h05m`, `2d03h`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// How long before `now_ms` the instant `then_ms` was: `5m12s ago` (`just now` if in the future).
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    if then_ms == 0 {
        return String::new();
    }
    match now_ms.checked_sub(then_ms) {
        Some(ms) if ms >= 1000 => format!("{} ago", duration(ms / 1000)),
        _ => "just now".to_string(),
    }
}

/// A UTC wall-clock time, `2026-11-23 13:21:00 UTC`, from milliseconds since the Unix epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let (h, mi, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A rate with one decimal, `340.5`, or as compact as [`count`] from 10000 up.
pub fn rate(per_s: f64) -> String {
    if per_s < 10_000.0 { format!("{per_s:.1}") } else { count(per_s as u64) }
}

/// A counter in at most five characters: `99999`, `1234k`, `5678M`.
pub fn count(n: u64) -> String {
    match n {
        0..100_000 => n.to_string(),
        100_000..10_000_000 => format!("{}k", n / 1000),
        _ => format!("{}M", n / 1_000_000),
    }
}

/// An optional counter: empty when the server did not say.
pub fn opt<T: ToString>(value: Option<T>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

/// Cuts `text` to `max` characters, marking the cut with `…`.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((i, _)) if text.chars().count() > max => format!("{}…", &text[..i]),
        _ => text.to_string(),
    }
}

/// `1 connection` / `3 connections`.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Asserts every line of `text` fits [`WIDTH`] columns (tests of each command use it).
#[cfg(test)]
pub fn assert_fits(text: &str) {
    for line in text.lines() {
        assert!(line.chars().count() <= WIDTH as usize, "{} columns: {line:?}", line.chars().count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_an_operator_would_say_them() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(312), "5m12s");
        assert_eq!(duration(3600), "1h00m");
        assert_eq!(duration(3 * 3600 + 5 * 60 + 59), "3h05m");
        assert_eq!(duration(2 * 86_400 + 3 * 3600), "2d03h");
    }

    #[test]
    fn ago_counts_back_from_now() {
        let now = 1_795_440_312_000;
        assert_eq!(ago(now - 312_000, now), "5m12s ago");
        assert_eq!(ago(now - 999, now), "just now");
        assert_eq!(ago(now + 5000, now), "just now", "a node clock ahead of ours");
        assert_eq!(ago(0, now), "", "unknown");
    }

    #[test]
    fn utc_formats_calendar_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_440_060_000), "2026-11-23 13:21:00 UTC");
    }

    #[test]
    fn counts_and_rates_stay_short() {
        assert_eq!(count(99_999), "99999");
        assert_eq!(count(123_456), "123k");
        assert_eq!(count(9_999_999), "9999k");
        assert_eq!(count(12_345_678), "12M");
        assert_eq!(rate(113.5), "113.5");
        assert_eq!(rate(0.04), "0.0");
        assert_eq!(rate(123_456.7), "123k");
    }

    #[test]
    fn cut_marks_what_it_drops() {
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abcd", 4), "abcd");
        assert_eq!(cut("ééééé", 3), "éé…");
    }

    #[test]
    fn empty_columns_are_left_out_and_wide_tables_wrap_to_80() {
        let cols = [Col::text("A"), Col::text("NOTE").hide(Hide::WhenBlank), Col::num("N").hide(Hide::WhenZero)];
        let rows = vec![vec!["x".into(), String::new(), "0".into()]];
        assert_eq!(render(&cols, &rows), "A\nx");

        let cols = [Col::text("KEY"), Col::text("VALUE").wrap()];
        let rows = vec![vec!["k".into(), "word ".repeat(40)]];
        let text = render(&cols, &rows);
        assert_fits(&text);
        assert!(text.lines().count() > 2, "long cell wraps:\n{text}");
    }
}
