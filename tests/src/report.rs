//! The benchmarks' report: figures repeated over runs shown as ranges,
//! Markdown tables, and the options every benchmark binary takes.
//!
//! A benchmark binary prints its section of `BENCHMARKS.md` (Markdown) on
//! stdout and its progress on stderr; `cargo xtask bench` puts the
//! sections together under a header naming the machine and the commands.
//! A figure measured in each of several runs is a [`Samples`]: the report
//! shows its range and median, never a single best run.

use std::fmt::Write as _;

/// What a benchmark binary was asked for on its command line.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// A reduced run that only shows the benchmark still works (CI).
    pub quick: bool,
    /// How many times each measurement is repeated; `None`: the
    /// benchmark's own default.
    pub runs: Option<usize>,
    /// Other `--name value` pairs, for the benchmark to read.
    pub extra: Vec<(String, String)>,
}

impl BenchOptions {
    /// Parses `--quick`, `--runs N` and any other `--name value` from the
    /// process's arguments; panics with a usage line on anything else.
    pub fn from_args() -> Self {
        Self::parse(std::env::args().skip(1))
    }

    /// Parses `args` as [`Self::from_args`] does.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Self {
        let mut out = Self {
            quick: false,
            runs: None,
            extra: Vec::new(),
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => out.quick = true,
                "--runs" => {
                    let n = args.next().and_then(|v| v.parse().ok()).filter(|&n| n > 0);
                    out.runs = Some(n.expect("--runs takes a number above 0"));
                }
                name if name.starts_with("--") => {
                    let value = args
                        .next()
                        .unwrap_or_else(|| panic!("{name} takes a value"));
                    out.extra.push((name[2..].to_string(), value));
                }
                other => panic!("unexpected argument `{other}`: try --quick, --runs N"),
            }
        }
        out
    }

    /// The value of `--name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.extra
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One figure measured once per run.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    /// Adds one run's figure (a NaN, a figure that could not be measured,
    /// is left out).
    pub fn push(&mut self, v: f64) {
        if !v.is_nan() {
            self.0.push(v);
        }
    }

    /// The smallest, the median and the largest, if any run measured it.
    pub fn summary(&self) -> Option<(f64, f64, f64)> {
        let mut v = self.0.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Some((v[0], mid, v[v.len() - 1]))
    }

    /// `min–max (median m)` with `decimals` places and `unit` after each
    /// figure; the figure alone for one run; `-` for none.
    pub fn range(&self, decimals: usize, unit: &str) -> String {
        match self.summary() {
            None => "-".into(),
            Some((lo, _, hi)) if self.0.len() == 1 || lo == hi => {
                format!("{lo:.decimals$}{unit}")
            }
            Some((lo, mid, hi)) => {
                format!("{lo:.decimals$}–{hi:.decimals$}{unit} (median {mid:.decimals$}{unit})")
            }
        }
    }

    /// Each run's figure in order, `a, b, c`.
    pub fn each(&self, decimals: usize) -> String {
        let parts: Vec<String> = self.0.iter().map(|v| format!("{v:.decimals$}")).collect();
        parts.join(", ")
    }

    /// How many runs are at most `bound`.
    pub fn at_most(&self, bound: f64) -> usize {
        self.0.iter().filter(|&&v| v <= bound).count()
    }
}

/// A Markdown table; columns after the first are right-aligned.
#[derive(Clone, Debug)]
pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headings.
    pub fn new<S: ToString>(head: impl IntoIterator<Item = S>) -> Self {
        Self {
            head: head.into_iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells are left empty, extra ones dropped).
    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut r: Vec<String> = cells.into_iter().map(|c| c.to_string()).collect();
        r.resize(self.head.len(), String::new());
        self.rows.push(r);
    }

    /// The table in Markdown, ending with a blank line.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out.push_str(&line(&self.head));
        let rule: Vec<String> = (0..self.head.len())
            .map(|i| if i == 0 { "---" } else { "---:" }.to_string())
            .collect();
        out.push_str(&line(&rule));
        for r in &self.rows {
            // A cell's own `|` would end it.
            let cells: Vec<String> = r.iter().map(|c| c.replace('|', "\\|")).collect();
            out.push_str(&line(&cells));
        }
        out.push('\n');
        out
    }
}

/// A section of the report being written: headings, paragraphs and
/// tables, in order.
#[derive(Clone, Debug, Default)]
pub struct Section(String);

impl Section {
    /// An empty section.
    pub fn new() -> Self {
        Self::default()
    }

    /// A heading of `level` (`##` is 2).
    pub fn heading(&mut self, level: usize, text: &str) {
        let _ = writeln!(self.0, "{} {text}\n", "#".repeat(level));
    }

    /// A paragraph.
    pub fn para(&mut self, text: &str) {
        let _ = writeln!(self.0, "{text}\n");
    }

    /// A table.
    pub fn table(&mut self, t: &Table) {
        self.0.push_str(&t.markdown());
    }

    /// The Markdown so far.
    pub fn markdown(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_shows_its_ends_and_median() {
        let mut s = Samples::default();
        assert_eq!(s.range(1, " µs"), "-");
        s.push(3.0);
        assert_eq!(s.range(1, " µs"), "3.0 µs");
        s.push(1.0);
        s.push(f64::NAN);
        s.push(2.5);
        assert_eq!(s.range(2, "×"), "1.00–3.00× (median 2.50×)");
        assert_eq!(s.each(0), "3, 1, 2");
        assert_eq!(s.at_most(2.5), 2);
    }

    #[test]
    fn tables_escape_their_cells_and_align_figures() {
        let mut t = Table::new(["a", "b"]);
        t.row(["x|y", "1"]);
        t.row(["z"]);
        assert_eq!(
            t.markdown(),
            "| a | b |\n| --- | ---: |\n| x\\|y | 1 |\n| z |  |\n\n"
        );
    }

    #[test]
    fn options_take_quick_runs_and_named_values() {
        let o = BenchOptions::parse(
            ["--quick", "--runs", "3", "--rate", "5000"]
                .iter()
                .map(|s| s.to_string()),
        );
        assert!(o.quick);
        assert_eq!(o.runs, Some(3));
        assert_eq!(o.get("rate"), Some("5000"));
        assert_eq!(o.get("other"), None);
    }
}
