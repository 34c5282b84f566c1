//! The side-by-side report: reads the JSON the other benches wrote to `target/bench`
//! (`throughput.json`, `throughput-parallel.json`, `latency.json`, `migration.json`; any may be
//! missing) and writes `summary.md` (one table, path by path, then each bench's own tables),
//! `summary.json` and `chart.svg` (throughput, CPU per GiB and migration time per path).
//! See `benches/README.md`.
//!
//! `cargo bench --bench report [-- --dir target/bench]`

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Inputs

/// The benches' result files, by what they hold.
#[derive(Clone, Copy, PartialEq)]
enum Src {
    /// `throughput` with one stream.
    Tp1,
    /// `throughput --streams N` (N from the file).
    TpN,
    Latency,
    Migration,
}

/// File names in the bench directory; `run-all` writes them under these names.
const FILES: [(Src, &str); 4] = [
    (Src::Tp1, "throughput"),
    (Src::TpN, "throughput-parallel"),
    (Src::Latency, "latency"),
    (Src::Migration, "migration"),
];

struct Inputs {
    dir: PathBuf,
    /// The parsed JSON of each file that is there and parses.
    json: Vec<(Src, Value)>,
}

impl Inputs {
    fn load(dir: &Path) -> Inputs {
        let json = FILES
            .iter()
            .filter_map(|(src, name)| {
                let file = dir.join(format!("{name}.json"));
                let text = fs::read_to_string(&file).ok()?;
                match serde_json::from_str(&text) {
                    Ok(v) => Some((*src, v)),
                    Err(e) => {
                        eprintln!("report: ignoring {}: {e}", file.display());
                        None
                    }
                }
            })
            .collect();
        Inputs {
            dir: dir.to_path_buf(),
            json,
        }
    }

    fn get(&self, src: Src) -> Option<&Value> {
        self.json.iter().find(|(s, _)| *s == src).map(|(_, v)| v)
    }

    /// The parallel run's stream count, for headers.
    fn streams(&self) -> u64 {
        self.get(Src::TpN)
            .and_then(|v| v["streams"].as_u64())
            .unwrap_or(8)
    }

    /// One path's entry in one file.
    fn entry(&self, src: Src, path: &str) -> Option<&Value> {
        self.get(src)?["paths"]
            .as_array()?
            .iter()
            .find(|p| p["path"] == path)
    }

    /// Every path in any file: the first file's order, paths only another file has inserted
    /// after the path they follow there.
    fn paths(&self) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        for (_, v) in &self.json {
            let mut after: Option<usize> = None;
            for name in v["paths"].as_array().into_iter().flatten() {
                let Some(name) = name["path"].as_str() else {
                    continue;
                };
                after = Some(match out.iter().position(|p| p == name) {
                    Some(i) => i,
                    None => {
                        let i = after.map_or(out.len(), |a| a + 1);
                        out.insert(i, name.to_string());
                        i
                    }
                });
            }
        }
        out
    }

    fn machine(&self) -> Option<&Value> {
        self.json
            .iter()
            .map(|(_, v)| &v["machine"])
            .find(|m| m.is_object())
    }
}

/// One figure of one path: a number, or why there is none.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    Value(f64),
    /// The path was skipped or failed ("skipped", "error").
    Status(String),
    /// Not measured (file or path absent, figure not applicable).
    Missing,
}

impl Cell {
    fn of(inputs: &Inputs, src: Src, path: &str, key: &str) -> Cell {
        let Some(e) = inputs.entry(src, path) else {
            return Cell::Missing;
        };
        match e["status"].as_str() {
            Some("ok") => e[key].as_f64().map_or(Cell::Missing, Cell::Value),
            Some(s) => Cell::Status(s.to_string()),
            None => Cell::Missing,
        }
    }

    fn value(&self) -> Option<f64> {
        match self {
            Cell::Value(v) => Some(*v),
            _ => None,
        }
    }

    fn text(&self, decimals: usize) -> String {
        match self {
            Cell::Value(v) => format!("{v:.decimals$}"),
            Cell::Status(s) => s.clone(),
            Cell::Missing => "-".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The side-by-side table

struct Column {
    /// `{n}` stands for the parallel run's stream count.
    header: &'static str,
    src: Src,
    key: &'static str,
    /// Divides the JSON value (KiB to MiB).
    scale: f64,
    decimals: usize,
    /// The key in summary.json.
    id: &'static str,
}

/// RSS figures are KiB in the benches' JSON and MiB in the table.
const KIB_PER_MIB: f64 = 1024.0;

/// The side-by-side table's columns after the path, in order.
#[rustfmt::skip]
const COLUMNS: &[Column] = &[
    Column { header: "GB/s, 1 stream", src: Src::Tp1, key: "median_gb_per_s", scale: 1.0, decimals: 2, id: "gb_per_s_1_stream" },
    Column { header: "GB/s, {n} streams", src: Src::TpN, key: "median_gb_per_s", scale: 1.0, decimals: 2, id: "gb_per_s_n_streams" },
    Column { header: "migtun / path, 1 stream", src: Src::Tp1, key: "migtun_ratio", scale: 1.0, decimals: 2, id: "migtun_ratio_1_stream" },
    Column { header: "CPU s/GiB, 1 stream", src: Src::Tp1, key: "median_cpu_s_per_gib", scale: 1.0, decimals: 2, id: "cpu_s_per_gib_1_stream" },
    Column { header: "CPU s/GiB, {n} streams", src: Src::TpN, key: "median_cpu_s_per_gib", scale: 1.0, decimals: 2, id: "cpu_s_per_gib_n_streams" },
    Column { header: "peak RSS MiB src, {n} streams", src: Src::TpN, key: "peak_rss_kib_src", scale: KIB_PER_MIB, decimals: 1, id: "peak_rss_mib_src_n_streams" },
    Column { header: "peak RSS MiB dst, {n} streams", src: Src::TpN, key: "peak_rss_kib_dst", scale: KIB_PER_MIB, decimals: 1, id: "peak_rss_mib_dst_n_streams" },
    Column { header: "ping p50 µs", src: Src::Latency, key: "median_ping_p50_us", scale: 1.0, decimals: 1, id: "ping_p50_us" },
    Column { header: "stream open p50 µs", src: Src::Latency, key: "median_open_p50_us", scale: 1.0, decimals: 0, id: "open_p50_us" },
    Column { header: "migration total s", src: Src::Migration, key: "median_total_s", scale: 1.0, decimals: 2, id: "migration_total_s" },
];

impl Column {
    fn cell(&self, inputs: &Inputs, path: &str) -> Cell {
        match Cell::of(inputs, self.src, path, self.key) {
            Cell::Value(v) => Cell::Value(v / self.scale),
            c => c,
        }
    }

    fn header(&self, streams: u64) -> String {
        self.header.replace("{n}", &streams.to_string())
    }
}

fn side_by_side_md(inputs: &Inputs, paths: &[String]) -> String {
    let n = inputs.streams();
    let headers: Vec<String> = COLUMNS.iter().map(|c| c.header(n)).collect();
    let mut out = format!(
        "| path | {} |\n|---|{}\n",
        headers.join(" | "),
        "---:|".repeat(COLUMNS.len())
    );
    for p in paths {
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|c| c.cell(inputs, p).text(c.decimals))
            .collect();
        out.push_str(&format!("| {p} | {} |\n", cells.join(" | ")));
    }
    out
}

fn machine_line(inputs: &Inputs) -> String {
    let Some(m) = inputs.machine() else {
        return String::new();
    };
    format!(
        "- machine: {} (nproc {}), kernel {}; load average when the first bench started: {}\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["nproc"],
        m["kernel"].as_str().unwrap_or("?"),
        m["loadavg_start"].as_str().unwrap_or("?")
    )
}

fn summary_md(inputs: &Inputs, paths: &[String]) -> String {
    let mut out = String::from("# Benchmarks side by side\n\n");
    out.push_str(&machine_line(inputs));
    for (src, name) in FILES {
        let state = if inputs.get(src).is_some() {
            "read"
        } else {
            "not run"
        };
        out.push_str(&format!("- `{name}.json`: {state}\n"));
    }
    out.push_str(
        "- CPU s/GiB: user+sys seconds of both relaying sides per GiB carried (direct = 0); \
         peak RSS: VmHWM summed over each side's processes; `skipped`/`error`: see the bench's own table below\n\n",
    );
    out.push_str(&side_by_side_md(inputs, paths));
    out.push_str("\n![throughput, CPU per GiB and migration time per path](chart.svg)\n");
    for (_, name) in FILES {
        if let Ok(md) = fs::read_to_string(inputs.dir.join(format!("{name}.md"))) {
            out.push('\n');
            out.push_str(&md);
        }
    }
    out
}

fn summary_json(inputs: &Inputs, paths: &[String]) -> Value {
    let rows: Vec<Value> = paths
        .iter()
        .map(|p| {
            let mut row = json!({ "path": p });
            for c in COLUMNS {
                row[c.id] = match c.cell(inputs, p) {
                    Cell::Value(v) => json!(v),
                    Cell::Status(s) => json!(s),
                    Cell::Missing => Value::Null,
                };
            }
            row
        })
        .collect();
    let files: Vec<Value> = FILES
        .iter()
        .map(|(src, name)| json!({ "file": format!("{name}.json"), "read": inputs.get(*src).is_some() }))
        .collect();
    json!({ "machine": inputs.machine(), "parallel_streams": inputs.streams(), "inputs": files, "paths": rows })
}

// ---------------------------------------------------------------------------------------------
// The chart

/// One bar series of a panel.
struct Series {
    /// `{n}` stands for the parallel run's stream count.
    label: &'static str,
    src: Src,
    key: &'static str,
    color: RGBColor,
}

struct Panel {
    title: &'static str,
    y_desc: &'static str,
    series: &'static [Series],
}

/// Colours of the series (matplotlib's first three, readable on white and to most colour-blind
/// readers).
const BLUE_1: RGBColor = RGBColor(31, 119, 180);
const ORANGE_N: RGBColor = RGBColor(255, 127, 14);
const GREEN_MIG: RGBColor = RGBColor(44, 160, 44);

#[rustfmt::skip]
const PANELS: &[Panel] = &[
    Panel {
        title: "Throughput, UNIX to UNIX (median GB/s, higher is better)",
        y_desc: "GB/s",
        series: &[
            Series { label: "1 stream", src: Src::Tp1, key: "median_gb_per_s", color: BLUE_1 },
            Series { label: "{n} streams", src: Src::TpN, key: "median_gb_per_s", color: ORANGE_N },
        ],
    },
    Panel {
        title: "CPU of both relaying sides per GiB carried (median, lower is better)",
        y_desc: "CPU s / GiB",
        series: &[
            Series { label: "1 stream", src: Src::Tp1, key: "median_cpu_s_per_gib", color: BLUE_1 },
            Series { label: "{n} streams", src: Src::TpN, key: "median_cpu_s_per_gib", color: ORANGE_N },
        ],
    },
    Panel {
        title: "Live migration with storage, total time (median s, lower is better)",
        y_desc: "seconds",
        series: &[Series { label: "migration", src: Src::Migration, key: "median_total_s", color: GREEN_MIG }],
    },
];

/// Chart size in pixels: three panels, each wide enough for eight path names side by side.
const CHART_SIZE: (u32, u32) = (1100, 1200);
/// Room above the tallest bar for its value label and the legend (upper right).
const HEADROOM: f64 = 1.45;
/// Share of a path's slot taken by its bars (the rest separates paths).
const GROUP_WIDTH: f64 = 0.8;
/// Any sans-serif font of the viewer: the SVG names a family, it embeds no font.
const FONT: &str = "sans-serif";
/// Text and layout sizes in pixels, readable at `CHART_SIZE`.
const TITLE_PX: u32 = 18;
const AXIS_PX: u32 = 14;
const VALUE_PX: u32 = 12;
const MARGIN_PX: u32 = 12;
/// Room below a panel for the path names and left of it for the y ticks and axis name.
const X_LABEL_AREA_PX: u32 = 28;
const Y_LABEL_AREA_PX: u32 = 56;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("{e:?}")
}

/// Each series' bars as (x0, x1, cell) per path.
fn bars(inputs: &Inputs, paths: &[String], panel: &Panel) -> Vec<Vec<(f64, f64, Cell)>> {
    let width = GROUP_WIDTH / panel.series.len() as f64;
    panel
        .series
        .iter()
        .enumerate()
        .map(|(k, s)| {
            paths
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let x0 = i as f64 - GROUP_WIDTH / 2.0 + k as f64 * width;
                    (x0, x0 + width * 0.95, Cell::of(inputs, s.src, p, s.key))
                })
                .collect()
        })
        .collect()
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The panel's caption, axes and path names; x = path index, bars at whole numbers.
fn panel_axes<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    paths: &[String],
    title: &str,
    y_desc: &str,
    y_max: f64,
) -> Result<Chart<'a, DB>, String> {
    let n = paths.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, TITLE_PX))
        .margin(MARGIN_PX)
        .x_label_area_size(X_LABEL_AREA_PX)
        .y_label_area_size(Y_LABEL_AREA_PX)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..y_max)
        .map_err(err)?;
    // With n + 1 labels asked for, plotters puts them on whole numbers: the paths' slots.
    let name = |x: &f64| match x.round() {
        i if (x - i).abs() < 1e-6 && i >= 0.0 => paths.get(i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(n + 1)
        .x_label_formatter(&name)
        .x_label_style((FONT, AXIS_PX))
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// One series' bars, with its value (or `skipped`/`error`) above each, and its legend entry.
fn draw_bars<DB: DrawingBackend>(
    chart: &mut Chart<'_, DB>,
    s: &Series,
    bars: &[(f64, f64, Cell)],
    streams: u64,
) -> Result<(), String> {
    let color = s.color;
    chart
        .draw_series(bars.iter().filter_map(|(x0, x1, c)| {
            Some(Rectangle::new(
                [(*x0, 0.0), (*x1, c.value()?)],
                color.filled(),
            ))
        }))
        .map_err(err)?
        .label(s.label.replace("{n}", &streams.to_string()))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    let style =
        TextStyle::from((FONT, VALUE_PX).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let labels = bars
        .iter()
        .filter(|b| b.2 != Cell::Missing)
        .map(|(x0, x1, c)| {
            let y = c.value().unwrap_or(0.0);
            Text::new(c.text(2), ((x0 + x1) / 2.0, y), style.clone())
        });
    chart.draw_series(labels).map_err(err)?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    inputs: &Inputs,
    paths: &[String],
    panel: &Panel,
) -> Result<(), String> {
    let series = bars(inputs, paths, panel);
    let values = series.iter().flatten().filter_map(|b| b.2.value());
    let top = values.fold(0.0f64, f64::max);
    let (title, y_max) = if top > 0.0 {
        (panel.title.to_string(), top * HEADROOM)
    } else {
        (format!("{}: no results", panel.title), 1.0)
    };
    let mut chart = panel_axes(area, paths, &title, panel.y_desc, y_max)?;
    for (s, bars) in panel.series.iter().zip(&series) {
        draw_bars(&mut chart, s, bars, inputs.streams())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, AXIS_PX))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(err)
}

fn draw_chart(file: &Path, inputs: &Inputs, paths: &[String]) -> Result<(), String> {
    let root = SVGBackend::new(file, CHART_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (area, panel) in root.split_evenly((PANELS.len(), 1)).iter().zip(PANELS) {
        draw_panel(area, inputs, paths, panel)?;
    }
    root.present().map_err(err)?;
    eprintln!("report: wrote {}", file.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn write(file: &Path, text: &str) -> bool {
    match fs::write(file, text) {
        Ok(()) => {
            eprintln!("report: wrote {}", file.display());
            true
        }
        Err(e) => {
            eprintln!("report: cannot write {}: {e}", file.display());
            false
        }
    }
}

/// `cargo bench --bench report -- [OPTIONS]`; see `benches/README.md`.
#[derive(clap::Parser, Debug)]
#[command(name = "report", bin_name = "cargo bench --bench report --", about = "The side-by-side report of the other benches' results")]
struct Args {
    /// Where the other benches wrote their JSON, and where the report goes [default: target/bench].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    cargo: common::CargoBench,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let dir = args.dir.unwrap_or_else(common::bench_dir);
    let inputs = Inputs::load(&dir);
    if inputs.json.is_empty() {
        eprintln!(
            "report: no bench results in {}: run the benches first (benches/run-all)",
            dir.display()
        );
        std::process::exit(1);
    }
    let paths = inputs.paths();
    let md = summary_md(&inputs, &paths);
    println!("{}", side_by_side_md(&inputs, &paths));
    let json = serde_json::to_string_pretty(&summary_json(&inputs, &paths)).unwrap_or_default();
    let mut ok = write(&dir.join("summary.md"), &md) & write(&dir.join("summary.json"), &json);
    if let Err(e) = draw_chart(&dir.join("chart.svg"), &inputs, &paths) {
        eprintln!("report: chart: {e}");
        ok = false;
    }
    if !ok {
        std::process::exit(1);
    }
}
