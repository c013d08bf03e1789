//! The benchmarks' report: figures repeated over runs shown as ranges,
//! Markdown tables, and the options every benchmark binary takes.
//!
//! A benchmark binary prints its section of `BENCHMARKS.md` (Markdown) on
//! stdout and its progress on stderr; `cargo xtask bench` puts the
//! sections together under a header naming the machine and the commands.
//! A figure measured in each of several runs is a [`Samples`]: the report
//! shows its range and median, never a single best run. A [`BarChart`]
//! draws such figures as SVG (a bar at the median, a whisker over the
//! range, a dot for every run), which [`Section::chart`] writes beside
//! the report and links.

use std::{fmt::Write as _, path::PathBuf};

use plotters::prelude::*;

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
            // Runs that agree to the places shown show one figure.
            Some((lo, _, hi))
                if self.0.len() == 1
                    || format!("{lo:.decimals$}") == format!("{hi:.decimals$}") =>
            {
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

/// A grouped bar chart of figures measured over several runs: for each
/// group (a case) one bar per series (a target), at the median, with a
/// whisker from the smallest to the largest run and a dot for each run,
/// so a reader sees the spread and no single best run.
#[derive(Clone, Debug)]
pub struct BarChart {
    title: String,
    y_label: String,
    series: Vec<String>,
    /// Group name, then one `Samples` per series.
    groups: Vec<(String, Vec<Samples>)>,
    /// A horizontal line: its value and what it means.
    reference: Option<(f64, String)>,
}

/// The series' colours, in order (colour-blind safe, from Okabe and Ito).
const PALETTE: [RGBColor; 5] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
];

impl BarChart {
    /// An empty chart with one bar per group for each of `series`.
    pub fn new<S: ToString>(
        title: &str,
        y_label: &str,
        series: impl IntoIterator<Item = S>,
    ) -> Self {
        Self {
            title: title.into(),
            y_label: y_label.into(),
            series: series.into_iter().map(|s| s.to_string()).collect(),
            groups: Vec::new(),
            reference: None,
        }
    }

    /// Adds a group: its name and one `Samples` per series (an empty one
    /// draws no bar).
    pub fn group(&mut self, name: &str, values: Vec<Samples>) {
        assert_eq!(values.len(), self.series.len(), "one value per series");
        self.groups.push((name.into(), values));
    }

    /// Draws a horizontal line at `value`, labelled `what` in the legend.
    pub fn reference(&mut self, value: f64, what: &str) {
        self.reference = Some((value, what.into()));
    }

    /// The chart as an SVG document.
    pub fn svg(&self) -> String {
        let mut out = String::new();
        self.draw(&mut out)
            .unwrap_or_else(|e| panic!("chart `{}`: {e}", self.title));
        out
    }

    fn draw(&self, out: &mut String) -> Result<(), Box<dyn std::error::Error + '_>> {
        let groups = self.groups.len().max(1);
        let top = self
            .groups
            .iter()
            .flat_map(|(_, v)| v.iter().flat_map(|s| s.0.iter().copied()))
            .chain(self.reference.iter().map(|r| r.0))
            .fold(0.0f64, f64::max);
        // Room above the tallest whisker for the legend.
        let y_max = if top > 0.0 { top * 1.3 } else { 1.0 };
        let width = 160 + 70 * groups as u32 * (self.series.len() as u32 + 1);
        let root = SVGBackend::with_string(out, (width.clamp(480, 1100), 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let names: Vec<&str> = self.groups.iter().map(|(n, _)| n.as_str()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..groups as f64, 0.0..y_max)?;
        // Group `i` spans [i, i + 1): a label at its centre only (x labels
        // every half unit put one there).
        let label = |x: &f64| {
            let half = (x * 2.0).round() as i64;
            if half % 2 == 1 {
                names
                    .get((half / 2) as usize)
                    .map_or(String::new(), |n| n.to_string())
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_max_light_lines(1)
            .x_labels(2 * groups + 1)
            .x_label_formatter(&label)
            .y_desc(self.y_label.as_str())
            .label_style(("sans-serif", 13))
            .draw()?;
        let slot = 1.0 / (self.series.len() as f64 + 1.0);
        for (si, name) in self.series.iter().enumerate() {
            let colour = PALETTE[si % PALETTE.len()];
            let mut bars = Vec::new();
            let mut marks = Vec::new();
            for (gi, (_, values)) in self.groups.iter().enumerate() {
                let Some((lo, mid, hi)) = values[si].summary() else {
                    continue;
                };
                let x0 = gi as f64 + slot * (si as f64 + 0.5);
                let (x1, xc) = (x0 + slot * 0.9, x0 + slot * 0.45);
                bars.push(Rectangle::new([(x0, 0.0), (x1, mid)], colour.filled()));
                marks.push(PathElement::new(
                    vec![(xc, lo), (xc, hi)],
                    BLACK.stroke_width(1),
                ));
                for &v in &values[si].0 {
                    marks.push(PathElement::new(
                        vec![(x0 + slot * 0.2, v), (x1 - slot * 0.2, v)],
                        BLACK.stroke_width(2),
                    ));
                }
            }
            chart
                .draw_series(bars)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
            chart.draw_series(marks)?;
        }
        if let Some((value, what)) = &self.reference {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.0, *value), (groups as f64, *value)],
                    RED.stroke_width(1),
                )))?
                .label(what.as_str())
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 12, y)], RED.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// A section of the report being written: headings, paragraphs, tables
/// and charts, in order.
#[derive(Clone, Debug, Default)]
pub struct Section {
    text: String,
    /// Where charts are written; `None`: charts are left out.
    charts: Option<PathBuf>,
}

impl Section {
    /// An empty section without charts.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty section whose charts are written into `dir` and linked
    /// as `<dir's last component>/<name>.svg`: the report belongs in the
    /// directory that holds `dir`.
    pub fn with_charts(dir: Option<PathBuf>) -> Self {
        Self {
            text: String::new(),
            charts: dir,
        }
    }

    /// Writes `chart` as `<name>.svg` and links it (with `chart`'s title
    /// as its text), if this section has a charts directory.
    pub fn chart(&mut self, name: &str, chart: &BarChart) {
        let Some(dir) = &self.charts else {
            return;
        };
        std::fs::create_dir_all(dir).expect("charts directory");
        let file = format!("{name}.svg");
        std::fs::write(dir.join(&file), chart.svg()).expect("write a chart");
        let link = dir
            .file_name()
            .map_or(file.clone(), |d| format!("{}/{file}", d.to_string_lossy()));
        let _ = writeln!(self.text, "![{}]({link})\n", chart.title);
    }

    /// A heading of `level` (`##` is 2).
    pub fn heading(&mut self, level: usize, text: &str) {
        let _ = writeln!(self.text, "{} {text}\n", "#".repeat(level));
    }

    /// A paragraph.
    pub fn para(&mut self, text: &str) {
        let _ = writeln!(self.text, "{text}\n");
    }

    /// A table.
    pub fn table(&mut self, t: &Table) {
        self.text.push_str(&t.markdown());
    }

    /// The Markdown so far.
    pub fn markdown(&self) -> &str {
        &self.text
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
        assert_eq!(Samples(vec![2943.2, 2942.8]).range(0, ""), "2943");
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
    fn a_chart_draws_every_run_and_its_labels() {
        let mut c = BarChart::new("CPU per request", "µs", ["nutcracker", "guard"]);
        c.group("get", vec![Samples(vec![10.0, 12.0]), Samples(vec![7.5])]);
        c.group("set", vec![Samples(vec![9.0]), Samples::default()]);
        c.reference(1.0, "target");
        let svg = c.svg();
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in [
            "CPU per request",
            "nutcracker",
            "guard",
            "get",
            "set",
            "target",
        ] {
            assert!(
                svg.contains(&format!(">\n{text}\n</text>")),
                "{text} missing"
            );
        }
        // A bar per measured figure in its series' colour, and one in the
        // legend.
        assert_eq!(svg.matches("fill=\"#0072B2\"").count(), 2 + 1);
        assert_eq!(svg.matches("fill=\"#E69F00\"").count(), 1 + 1);
    }

    #[test]
    fn a_section_links_the_charts_it_writes() {
        let dir = std::env::temp_dir().join(format!("guard-report-{}", std::process::id()));
        let mut s = Section::with_charts(Some(dir.join("charts")));
        let mut c = BarChart::new("t", "y", ["a"]);
        c.group("g", vec![Samples(vec![1.0])]);
        s.chart("one", &c);
        assert_eq!(s.markdown(), "![t](charts/one.svg)\n\n");
        assert!(dir.join("charts/one.svg").exists());
        let _ = std::fs::remove_dir_all(&dir);
        let mut none = Section::new();
        none.chart("one", &c);
        assert_eq!(none.markdown(), "");
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
