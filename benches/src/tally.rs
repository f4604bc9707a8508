//! A benchmark's figures over several runs, summarised as min / median / max (the lab is
//! noisy: the speed issue asks for at least three runs).

use std::fmt::Write as _;

/// One row's figures, in the order first recorded.
#[derive(Debug)]
struct Row {
    name: String,
    unit: &'static str,
    /// Met when the median is at most this.
    target: Option<f64>,
    values: Vec<f64>,
}

/// Figures by row over the runs of one benchmark.
#[derive(Debug, Default)]
pub struct Tally {
    rows: Vec<Row>,
}

impl Tally {
    /// Records one run's `value` of row `name` (a ratio, printed as `0.123x`).
    pub fn ratio(&mut self, name: &str, value: f64, target: Option<f64>) {
        self.record(name, "x", value, target);
    }

    /// Records one run's `value` of row `name`, in `unit` (e.g. `kB`).
    pub fn record(&mut self, name: &str, unit: &'static str, value: f64, target: Option<f64>) {
        match self.rows.iter_mut().find(|r| r.name == name) {
            Some(r) => r.values.push(value),
            None => self.rows.push(Row {
                name: name.to_string(),
                unit,
                target,
                values: vec![value],
            }),
        }
    }

    /// The summary: per row its min / median (the upper one of an even count, as
    /// [`crate::median`]) / max and how many runs gave it, and whether the median meets the
    /// row's target. Empty when nothing was recorded.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
        for r in &self.rows {
            let mut v = r.values.clone();
            v.sort_by(f64::total_cmp);
            let (min, max) = (v[0], v[v.len() - 1]);
            let median = v[v.len() / 2];
            let fmt = |x: f64| match r.unit {
                "x" => format!("{x:.3}x"),
                unit => format!("{x:.0} {unit}"),
            };
            let _ = write!(
                out,
                "   {:<width$}  {} / {} / {} ({} runs)",
                r.name,
                fmt(min),
                fmt(median),
                fmt(max),
                v.len()
            );
            if let Some(t) = r.target {
                let _ = write!(
                    out,
                    ", target <= {}: {}",
                    fmt(t),
                    if median <= t { "met" } else { "MISSED" }
                );
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_gives_each_rows_min_median_and_max_and_judges_the_median() {
        let mut t = Tally::default();
        for v in [0.30, 0.10, 0.20] {
            t.ratio("fork(4)", v, Some(0.2));
        }
        t.record("child RAM", "kB", 900.0, Some(1024.0));
        t.ratio("fork(4)", 0.25, Some(0.2));
        let s = t.summary();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 2, "{s}");
        assert!(
            lines[0].contains("0.100x / 0.250x / 0.300x (4 runs), target <= 0.200x: MISSED"),
            "{s}"
        );
        assert!(
            lines[1].contains("900 kB / 900 kB / 900 kB (1 runs), target <= 1024 kB: met"),
            "{s}"
        );
    }
}
