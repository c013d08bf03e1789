//! The report's charts, drawn with plotters' SVG backend: one chart per
//! quantity, before and after on the same time axis, phases shaded and
//! named.

use std::ops::Range;

use anyhow::Result;
use plotters::{
    coord::{Shift, types::RangedCoordf64},
    prelude::*,
};

use super::report::{Report, SideReport};

/// Before's colour (nutcracker) and after's (guard).
const BEFORE: RGBColor = RGBColor(214, 39, 40);
const AFTER: RGBColor = RGBColor(31, 119, 180);
/// One colour per tenant in the latency chart.
const TENANT_COLOURS: [RGBColor; 3] = [
    RGBColor(230, 120, 0),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];
const BAND: RGBColor = RGBColor(238, 238, 238);

const WIDTH: u32 = 1200;
const CHART_HEIGHT: u32 = 300;
const TITLE_HEIGHT: u32 = 50;
/// Room right of each chart for its legend.
const LEGEND_WIDTH: u32 = 170;

/// One line: its legend, colour, whether dashed (before), points.
struct Line {
    label: String,
    colour: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// The four charts in one SVG document.
pub fn draw(report: &Report) -> Result<String> {
    let mut svg = String::new();
    {
        let height = TITLE_HEIGHT + 4 * CHART_HEIGHT;
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (title, rest) = root.split_vertically(TITLE_HEIGHT);
        let without = report
            .after_without
            .as_ref()
            .map_or(String::new(), |m| format!(" without {m}"));
        title.draw(&Text::new(
            format!(
                "The incident, replayed ({}): before = {} (dashed), after = {}{without} (solid)",
                report.mode, report.before.proxy, report.after.proxy
            ),
            (12, 16),
            ("sans-serif", 20).into_font(),
        ))?;
        let areas = rest.split_evenly((4, 1));
        let x_end = report.phases.last().map_or(1.0, |p| p.end_s);

        let mut latency = Vec::new();
        for (i, colour) in TENANT_COLOURS.iter().enumerate() {
            for (side, dashed) in [(&report.before, true), (&report.after, false)] {
                let Some(t) = side.series.tenants.get(i) else {
                    continue;
                };
                latency.push(Line {
                    label: format!("{} {}", t.name, if dashed { "before" } else { "after" }),
                    colour: *colour,
                    dashed,
                    points: t
                        .seconds
                        .iter()
                        .map(|&(s, p99, _)| (s, p99.max(0.05)))
                        .collect(),
                });
            }
        }
        log_chart(
            &areas[0],
            report,
            "p99 latency per tenant and second, ms (log scale; a client gives up at the timeout)",
            x_end,
            0.05..2_000.0,
            latency,
        )?;

        let both = |f: &dyn Fn(&SideReport) -> Vec<(f64, f64)>| {
            vec![
                Line {
                    label: format!("before: {}", report.before.proxy),
                    colour: BEFORE,
                    dashed: true,
                    points: f(&report.before),
                },
                Line {
                    label: format!("after: {}", report.after.proxy),
                    colour: AFTER,
                    dashed: false,
                    points: f(&report.after),
                },
            ]
        };
        let mut errors = Vec::new();
        for (i, colour) in TENANT_COLOURS.iter().enumerate() {
            for (side, dashed) in [(&report.before, true), (&report.after, false)] {
                let Some(t) = side.series.tenants.get(i) else {
                    continue;
                };
                errors.push(Line {
                    label: format!("{} {}", t.name, if dashed { "before" } else { "after" }),
                    colour: *colour,
                    dashed,
                    points: t.seconds.iter().map(|&(s, _, e)| (s, e as f64)).collect(),
                });
            }
        }
        linear_chart(
            &areas[1],
            report,
            "errors per tenant and second: timeouts, error replies (over budget too), failed connects",
            x_end,
            errors,
        )?;
        let open = both(&|s: &SideReport| {
            s.series
                .sockets
                .iter()
                .map(|&(t, open, _)| (t, f64::from(open)))
                .collect()
        });
        linear_chart(
            &areas[2],
            report,
            "connections open on the proxy port (established + CLOSE_WAIT)",
            x_end,
            open,
        )?;
        let close_wait = both(&|s: &SideReport| {
            s.series
                .sockets
                .iter()
                .map(|&(t, _, cw)| (t, f64::from(cw)))
                .collect()
        });
        linear_chart(
            &areas[3],
            report,
            "sockets in CLOSE_WAIT on the proxy port (the client left, the proxy still holds it)",
            x_end,
            close_wait,
        )?;
        root.present()?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn linear_chart(
    area: &Area<'_>,
    report: &Report,
    caption: &str,
    x_end: f64,
    lines: Vec<Line>,
) -> Result<()> {
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .margin_right(LEGEND_WIDTH)
        .x_label_area_size(28)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_end, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("seconds into the run")
        .draw()?;
    bands(&mut chart, report, 0.0, top, top * 0.93)?;
    draw_lines(area, &mut chart, lines)?;
    Ok(())
}

fn log_chart(
    area: &Area<'_>,
    report: &Report,
    caption: &str,
    x_end: f64,
    y: Range<f64>,
    lines: Vec<Line>,
) -> Result<()> {
    let (lo, hi) = (y.start, y.end);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(8)
        .margin_right(LEGEND_WIDTH)
        .x_label_area_size(28)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_end, y.log_scale())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("seconds into the run")
        .draw()?;
    bands(&mut chart, report, lo, hi, hi * 0.5)?;
    // The clients' timeout.
    let t = report.client_timeout_ms as f64;
    chart.draw_series(DashedLineSeries::new(
        vec![(0.0, t), (x_end, t)],
        3,
        5,
        BLACK.mix(0.4).stroke_width(1),
    ))?;
    draw_lines(area, &mut chart, lines)?;
    Ok(())
}

/// Every other phase shaded, each named at `label_y`.
fn bands<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    report: &Report,
    lo: f64,
    hi: f64,
    label_y: f64,
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    chart.draw_series(
        report
            .phases
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, p)| Rectangle::new([(p.start_s, lo), (p.end_s, hi)], BAND.filled())),
    )?;
    chart.draw_series(report.phases.iter().map(|p| {
        Text::new(
            p.name.clone(),
            (p.start_s + 0.3, label_y),
            ("sans-serif", 13).into_font().color(&BLACK.mix(0.6)),
        )
    }))?;
    Ok(())
}

fn draw_lines<'a, Y>(
    area: &Area<'_>,
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    lines: Vec<Line>,
) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    // The legend sits right of the plot, where no line can run under it.
    let x = area.dim_in_pixel().0 as i32 - LEGEND_WIDTH as i32 + 16;
    for (i, line) in lines.into_iter().enumerate() {
        let style = line.colour.stroke_width(2);
        let y = 44 + 18 * i as i32;
        if line.dashed {
            chart.draw_series(DashedLineSeries::new(line.points, 6, 4, style))?;
            area.draw(&PathElement::new(vec![(x, y), (x + 8, y)], style))?;
            area.draw(&PathElement::new(vec![(x + 13, y), (x + 21, y)], style))?;
        } else {
            chart.draw_series(LineSeries::new(line.points, style))?;
            area.draw(&PathElement::new(vec![(x, y), (x + 21, y)], style))?;
        }
        area.draw(&Text::new(
            line.label,
            (x + 28, y - 6),
            ("sans-serif", 12).into_font(),
        ))?;
    }
    Ok(())
}
