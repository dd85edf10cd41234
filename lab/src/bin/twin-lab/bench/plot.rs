//! `bench.svg`: four panels over the checkpoint rate (pause, guest throughput ratio, added
//! reply latency) and bytes sent against dirty bytes per epoch.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::plan::{Mode, Workload, PAGE};
use super::report::{aggregate, Agg, Report};

/// Name, colour index, solid points, dashed points.
type Series = (String, usize, Vec<(f64, f64)>, Vec<(f64, f64)>);
/// Name, colour index, points.
type Scatter = (String, usize, Vec<(f64, f64)>);

/// A colour per workload, distinct on white.
fn color(i: usize) -> RGBAColor {
    const C: [RGBColor; 6] = [
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()].to_rgba()
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e:?}")
}

fn bounds(series: &[Series], log: bool) -> (f64, f64) {
    let ys = series
        .iter()
        .flat_map(|s| s.2.iter().chain(s.3.iter()).map(|p| p.1))
        .filter(|y| y.is_finite() && (!log || *y > 0.0));
    let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    if lo > hi {
        return if log { (0.01, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 2.0, hi * 2.0)
    } else {
        (0.0, (hi * 1.15).max(1.05))
    }
}

fn panel<Y>(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    x_max: f64,
    y: Y,
    series: &[Series],
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, y)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .x_desc("checkpoints per second")
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    for (name, i, solid, dashed) in series {
        let color = color(*i);
        chart
            .draw_series(LineSeries::new(
                solid.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(solid.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
        if !dashed.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(
                    dashed.iter().copied(),
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;
    Ok(())
}

pub(super) fn draw(path: &Path, r: &Report<'_>) -> Result<()> {
    let p = r.plan;
    let x_max = p.rates.iter().copied().max().unwrap_or(100) as f64 * 1.1;
    let mut pause = Vec::new();
    let mut ratio = Vec::new();
    let mut added = Vec::new();
    let mut sent: Vec<Scatter> = Vec::new();
    let mut rates = p.rates.clone();
    rates.sort_unstable();
    for (wi, &w) in p.workload_list.iter().enumerate() {
        let base = aggregate(r.runs, w, Mode::Unprotected);
        let mut med = Vec::new();
        let mut p99 = Vec::new();
        let mut rat = Vec::new();
        let mut add = Vec::new();
        let mut sd = Vec::new();
        for &hz in &rates {
            let a = aggregate(r.runs, w, Mode::Protected(hz));
            let x = f64::from(hz);
            if let Some(d) = a.pause {
                med.push((x, d.median / 1e3));
                p99.push((x, d.p99 / 1e3));
            }
            let work = |a: &Agg| match w {
                Workload::Idle => None,
                Workload::Dirty(_) => a.dirty_mib_s,
                Workload::Tcp => a.rps,
                Workload::Disk(_) => a.disk_mib_s,
            };
            if let (Some(v), Some(b)) = (work(&a), work(&base)) {
                if b > 0.0 {
                    rat.push((x, v / b));
                }
            }
            if let (Some(l), Some(b)) = (a.latency, base.latency) {
                add.push((x, ((l.median - b.median) / 1e3).max(0.001)));
            }
            if let (Some(d), Some(b)) = (a.dirty_pages, a.epoch_bytes) {
                sd.push((
                    (d.median * PAGE as f64 / (1 << 20) as f64).max(1e-3),
                    (b.median / (1 << 20) as f64).max(1e-3),
                ));
            }
        }
        pause.push((w.label(), wi, med, p99));
        if !rat.is_empty() {
            ratio.push((w.label(), wi, rat, Vec::new()));
        }
        added.push((w.label(), wi, add, Vec::new()));
        sent.push((w.label(), wi, sd));
    }

    let root = SVGBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            "twin bench: protected vs unprotected (noisy shared 2-core machine; medians)",
            ("sans-serif", 22),
        )
        .map_err(err)?;
    let areas = root.split_evenly((2, 2));
    let (lo, hi) = bounds(&pause, true);
    panel(
        &areas[0],
        "Pause per checkpoint (solid median, dashed p99)",
        "ms (log)",
        x_max,
        (lo..hi).log_scale(),
        &pause,
    )?;
    let (_, hi) = bounds(&ratio, false);
    panel(
        &areas[1],
        "Guest throughput, protected / unprotected",
        "ratio",
        x_max,
        0f64..hi,
        &ratio,
    )?;
    let (lo, hi) = bounds(&added, true);
    panel(
        &areas[2],
        "Reply latency added (median)",
        "ms (log)",
        x_max,
        (lo..hi).log_scale(),
        &added,
    )?;
    sent_panel(&areas[3], &sent)?;
    root.present().map_err(err)?;
    Ok(())
}

fn sent_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    sent: &[Scatter],
) -> Result<()> {
    let vals = sent
        .iter()
        .flat_map(|s| s.2.iter().flat_map(|p| [p.0, p.1]));
    let (lo, hi) = vals.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if lo > hi {
        (0.001, 1.0)
    } else {
        (lo / 2.0, hi * 2.0)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Bytes sent vs dirty bytes per epoch (median per rate)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .x_desc("dirty MiB per epoch (log)")
        .y_desc("sent MiB per epoch (log)")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(vec![(lo, lo), (hi, hi)], BLACK.mix(0.4)))
        .map_err(err)?
        .label("sent = dirty")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
    for (name, i, pts) in sent {
        let color = color(*i);
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Circle::new((x + 9, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)?;
    Ok(())
}
