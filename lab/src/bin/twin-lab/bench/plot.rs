//! `bench.svg` and `bench.png` (the same drawing, for places that show only bitmaps: a
//! README, an issue): four panels over the checkpoint rate (pause, guest throughput ratio,
//! added reply latency) and bytes sent against dirty bytes per epoch.
//!
//! The text is laid out (both) and drawn (PNG) with DejaVu Sans read from the system
//! (Debian's fonts-dejavu-core, which .ci/run installs; `TWIN_PLOT_FONT` names another TTF):
//! plotters' bitmap backend has no fonts of its own. Without it the plots fail with an error
//! naming the font and the package, after bench.md and bench.json are written.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
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

fn panel<DB: DrawingBackend, Y>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
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

/// The plot's size in pixels.
const SIZE: (u32, u32) = (1400, 1000);
/// Where Debian's fonts-dejavu-core puts DejaVu Sans.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers DejaVu Sans as plotters' "sans-serif" for the bitmap backend, once.
fn bitmap_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let font = std::env::var_os("TWIN_PLOT_FONT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(FONT));
        let bytes = std::fs::read(&font).map_err(|e| {
            format!(
                "cannot read the font {} for the PNG (install fonts-dejavu-core, or set \
                 TWIN_PLOT_FONT to a TTF file): {e}",
                font.display()
            )
        })?;
        // Registered for the life of the process: plotters keeps a 'static reference.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a font plotters can use", font.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `bench.svg` at `svg` and the same plot as a PNG at `png`.
pub(super) fn draw(svg: &Path, png: &Path, r: &Report<'_>) -> Result<()> {
    let data = Data::of(r);
    // Both backends lay text out with the registered font (plotters' ab_glyph feature).
    bitmap_font().with_context(|| format!("writing {} and {}", svg.display(), png.display()))?;
    render(SVGBackend::new(svg, SIZE).into_drawing_area(), &data)
        .with_context(|| format!("writing {}", svg.display()))?;
    render(BitMapBackend::new(png, SIZE).into_drawing_area(), &data)
        .with_context(|| format!("writing {}", png.display()))
}

/// What the panels show.
struct Data {
    x_max: f64,
    pause: Vec<Series>,
    ratio: Vec<Series>,
    added: Vec<Series>,
    sent: Vec<Scatter>,
}

impl Data {
    fn of(r: &Report<'_>) -> Data {
        let p = r.plan;
        let x_max = p.rates.iter().copied().max().unwrap_or(100) as f64 * 1.1;
        let mut pause = Vec::new();
        let mut ratio = Vec::new();
        let mut added = Vec::new();
        let mut sent: Vec<Scatter> = Vec::new();
        let mut rates = p.rates.clone();
        rates.sort_unstable();
        for (wi, &w) in p.workload_list.iter().enumerate() {
            if w == Workload::Redis {
                // One rate only, and its numbers are redis-benchmark's: a table in bench.md.
                continue;
            }
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
                    Workload::Idle | Workload::Redis => None,
                    Workload::Dirty(_) | Workload::Write { .. } => a.dirty_mib_s,
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
        Data {
            x_max,
            pause,
            ratio,
            added,
            sent,
        }
    }
}

fn render<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    d: &Data,
) -> Result<()> {
    let (x_max, pause, ratio, added, sent) = (d.x_max, &d.pause, &d.ratio, &d.added, &d.sent);
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(
            "twin bench: protected vs unprotected (noisy shared 2-core machine; medians)",
            ("sans-serif", 22),
        )
        .map_err(err)?;
    let areas = root.split_evenly((2, 2));
    let (lo, hi) = bounds(pause, true);
    panel(
        &areas[0],
        "Pause per checkpoint (solid median, dashed p99)",
        "ms (log)",
        x_max,
        (lo..hi).log_scale(),
        pause,
    )?;
    let (_, hi) = bounds(ratio, false);
    panel(
        &areas[1],
        "Guest throughput, protected / unprotected",
        "ratio",
        x_max,
        0f64..hi,
        ratio,
    )?;
    let (lo, hi) = bounds(added, true);
    panel(
        &areas[2],
        "Reply latency added (median)",
        "ms (log)",
        x_max,
        (lo..hi).log_scale(),
        added,
    )?;
    sent_panel(&areas[3], sent)?;
    root.present().map_err(err)?;
    Ok(())
}

fn sent_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Data {
        let line = |k: f64| vec![(10.0, k), (40.0, 2.0 * k), (100.0, 4.0 * k)];
        Data {
            x_max: 110.0,
            pause: vec![("idle".into(), 0, line(0.3), line(1.0))],
            ratio: vec![("16M".into(), 1, line(0.2), Vec::new())],
            added: vec![("tcp".into(), 2, line(0.5), Vec::new())],
            sent: vec![("64M".into(), 3, vec![(0.5, 0.6), (2.0, 2.4)])],
        }
    }

    /// The PNG is the drawing, text included (the font is found and used), and a real PNG.
    #[test]
    fn the_png_has_the_plot_and_its_text() {
        bitmap_font().expect("DejaVu Sans (fonts-dejavu-core) for the PNG");
        let (w, h) = SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        render(
            BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area(),
            &data(),
        )
        .expect("render");
        let px = |x: u32, y: u32| {
            let i = ((y * w + x) * 3) as usize;
            (buf[i], buf[i + 1], buf[i + 2])
        };
        // The title band above the panels holds only the title's text: dark pixels there
        // mean the text was drawn.
        let dark_in_title = (0..w)
            .flat_map(|x| (0..28).map(move |y| (x, y)))
            .filter(|&(x, y)| {
                let (r, g, b) = px(x, y);
                u32::from(r) + u32::from(g) + u32::from(b) < 200
            })
            .count();
        assert!(
            dark_in_title > 200,
            "{dark_in_title} dark pixels in the title band"
        );
        // The series are drawn in their colours (red: workload 0).
        let red = buf
            .chunks(3)
            .filter(|p| p[0] > 180 && p[1] < 80 && p[2] < 80)
            .count();
        assert!(red > 100, "{red} red pixels: the first series is missing");

        let dir = std::env::temp_dir().join(format!("twin-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (svg, png) = (dir.join("bench.svg"), dir.join("bench.png"));
        let d = data();
        render(SVGBackend::new(&svg, SIZE).into_drawing_area(), &d).unwrap();
        render(BitMapBackend::new(&png, SIZE).into_drawing_area(), &d).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
        assert_eq!(&bytes[12..16], b"IHDR");
        let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!((dim(16), dim(20)), SIZE);
        assert!(std::fs::read_to_string(&svg)
            .unwrap()
            .contains("Pause per checkpoint"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
