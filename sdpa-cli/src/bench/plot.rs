//! `sdpa bench --plot`: the results table as an SVG bar chart, throughput
//! per case with one bar per pass, and with `--compare` one bar per torch
//! backend whose row has the case's shape.
//!
//! The chart is drawn in pixels on a plotters SVG drawing area (no fonts
//! are read: the SVG names a font family and the viewer lays the text out).
//! Every bar and every legend swatch is one `<rect>`, after the one of the
//! background, so that tests can read the bars back.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use sdpa_runtime::DType;

use crate::error::{CliError, Result};

/// One case of the table: its label and what it is, for `--compare` to
/// match torch's rows against, and its bars.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Group {
    /// The preset's name or the shape, and the dtype.
    pub(crate) label: String,
    /// The shape as torch's rows name it: `BxHqxSqxSkxD`.
    pub(crate) dims: String,
    /// The element type.
    pub(crate) dtype: DType,
    /// Whether the case is causal.
    pub(crate) causal: bool,
    /// The bars: series name (the pass, or `torch BACKEND`) and TFLOP/s.
    pub(crate) bars: Vec<(String, f64)>,
}

/// One row of a torch results JSON (as `docs/bench/torch_gpu_masked.py`
/// writes them): the shape, the backend and the throughput; `dtype` and
/// `causal`, where a row has them, must match the case's too. Rows with an
/// `error` (a torch backend that cannot run the case) are left out.
#[derive(Debug, serde::Deserialize)]
struct TorchRow {
    shape: String,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default)]
    tflops: Option<f64>,
    #[serde(default)]
    gflops: Option<f64>,
    #[serde(default)]
    dtype: Option<String>,
    #[serde(default)]
    causal: Option<bool>,
    /// Why torch could not run the case (the row has no throughput then).
    #[serde(default)]
    error: Option<String>,
}

impl TorchRow {
    /// Whether the row measured `group`'s problem.
    fn matches(&self, group: &Group) -> bool {
        self.shape == group.dims
            && self.causal.is_none_or(|c| c == group.causal)
            && self
                .dtype
                .as_deref()
                .is_none_or(|d| torch_dtype(d) == Some(group.dtype))
    }
}

/// The element type of a torch dtype name (`torch.bfloat16`, `bf16`, ...).
fn torch_dtype(name: &str) -> Option<DType> {
    match name.trim_start_matches("torch.") {
        "bfloat16" | "bf16" => Some(DType::BF16),
        "float16" | "half" | "f16" => Some(DType::F16),
        "float32" | "float" | "f32" => Some(DType::F32),
        _ => None,
    }
}

/// Adds to each group a bar per row of the torch JSON at `path` that has
/// its shape (and dtype and causal flag, where the row says), named
/// `torch BACKEND`. Returns how many rows matched a group.
pub(crate) fn add_torch(groups: &mut [Group], path: &Path) -> Result<usize> {
    let bytes = std::fs::read(path).map_err(|source| CliError::Read {
        path: path.to_owned(),
        source,
    })?;
    let bad = |reason: String| CliError::Compare {
        path: path.to_owned(),
        reason,
    };
    let rows: Vec<TorchRow> = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut matched = 0;
    for (i, row) in rows.iter().enumerate().filter(|(_, r)| r.error.is_none()) {
        let tflops = match (row.tflops, row.gflops) {
            (Some(t), _) => t,
            (None, Some(g)) => g / 1e3,
            (None, None) => return Err(bad(format!("row {i} has neither tflops nor gflops"))),
        };
        let name = match &row.backend {
            Some(b) => format!("torch {b}"),
            None => "torch".to_owned(),
        };
        for group in groups.iter_mut().filter(|g| row.matches(g)) {
            group.bars.push((name.clone(), tflops));
            matched += 1;
        }
    }
    Ok(matched)
}

/// Bar colours, one per series in order of first appearance.
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Pixel sizes of the chart.
const BAR_W: i32 = 18;
const GROUP_GAP: i32 = 24;
const LEFT: i32 = 80;
const RIGHT: i32 = 190;
const TOP: i32 = 50;
const PLOT_H: i32 = 360;
const FONT: &str = "sans-serif";

/// The throughput unit of the axis: TFLOP/s where the largest bar reaches
/// one, else GFLOP/s. Returns the unit and the factor from TFLOP/s.
fn unit(max_tflops: f64) -> (&'static str, f64) {
    if max_tflops >= 1.0 {
        ("TFLOP/s", 1.0)
    } else {
        ("GFLOP/s", 1e3)
    }
}

/// A round axis top and tick step (1, 2 or 5 times a power of ten) for
/// values up to `max`.
fn axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.2);
    }
    let rough = max / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * power);
    ((max / step).ceil() * step, step)
}

/// `value` with as many decimals as its size needs.
fn short(value: f64) -> String {
    if value == 0.0 {
        "0".to_owned()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

/// Draws `groups` as a bar chart titled `title` into the SVG file `path`.
pub(crate) fn draw(path: &Path, title: &str, groups: &[Group]) -> Result<()> {
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| CliError::Write {
        path: path.to_owned(),
        source: e,
    };
    let mut series: Vec<&str> = Vec::new();
    for (name, _) in groups.iter().flat_map(|g| &g.bars) {
        if !series.contains(&name.as_str()) {
            series.push(name);
        }
    }
    let max_bars = groups.iter().map(|g| g.bars.len()).max().unwrap_or(0) as i32;
    let longest = groups.iter().map(|g| g.label.len()).max().unwrap_or(0) as i32;
    let group_w = max_bars.max(1) * BAR_W + GROUP_GAP;
    let label_h = (longest * 8 + 16).min(300);
    let width = (LEFT + group_w * groups.len().max(1) as i32 + RIGHT).max(480);
    let height = TOP + PLOT_H + label_h;
    let max_tflops = groups
        .iter()
        .flat_map(|g| g.bars.iter().map(|b| b.1))
        .fold(0.0, f64::max);
    let (unit, scale) = unit(max_tflops);
    let (top, step) = axis(max_tflops * scale);
    let y_of = |value: f64| TOP + PLOT_H - ((value / top) * PLOT_H as f64).round() as i32;
    let plot_right = width - RIGHT;

    let root = SVGBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    let result = (|| -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
        root.fill(&WHITE)?;
        let text = |size: f64, h: HPos, v: VPos| {
            TextStyle::from((FONT, size).into_font()).pos(Pos::new(h, v))
        };
        root.draw_text(
            title,
            &text(20.0, HPos::Center, VPos::Top),
            ((LEFT + plot_right) / 2, 12),
        )?;
        // The value axis: grid lines and their values, then the unit.
        let grid = RGBColor(221, 221, 221);
        let ticks = (top / step).round() as i32;
        for i in 0..=ticks {
            let value = step * i as f64;
            let y = y_of(value);
            root.draw(&PathElement::new(
                vec![(LEFT, y), (plot_right, y)],
                if i == 0 { BLACK } else { grid },
            ))?;
            root.draw_text(
                &short(value),
                &text(13.0, HPos::Right, VPos::Center),
                (LEFT - 6, y),
            )?;
        }
        root.draw(&PathElement::new(
            vec![(LEFT, TOP), (LEFT, TOP + PLOT_H)],
            BLACK,
        ))?;
        root.draw_text(
            unit,
            &text(14.0, HPos::Left, VPos::Bottom),
            (LEFT - 60, TOP - 8),
        )?;
        // The bars, centred in their group, with their values above them.
        for (i, group) in groups.iter().enumerate() {
            let x0 = LEFT + GROUP_GAP / 2 + group_w * i as i32;
            let used = group.bars.len() as i32 * BAR_W;
            let start = x0 + (group_w - GROUP_GAP - used) / 2;
            for (j, (name, tflops)) in group.bars.iter().enumerate() {
                let color = COLORS[series.iter().position(|s| s == name).unwrap_or(0) % 8];
                let x = start + j as i32 * BAR_W;
                let value = tflops * scale;
                root.draw(&Rectangle::new(
                    [(x + 1, y_of(value)), (x + BAR_W - 1, TOP + PLOT_H)],
                    color.filled(),
                ))?;
                root.draw_text(
                    &short(value),
                    &text(10.0, HPos::Center, VPos::Bottom),
                    (x + BAR_W / 2, y_of(value) - 2),
                )?;
            }
            let centre = x0 + (group_w - GROUP_GAP) / 2;
            root.draw_text(
                &group.label,
                &TextStyle::from((FONT, 14.0).into_font().transform(FontTransform::Rotate270))
                    .pos(Pos::new(HPos::Right, VPos::Center)),
                (centre, TOP + PLOT_H + 8),
            )?;
        }
        // The legend: a swatch and a name per series.
        for (k, name) in series.iter().enumerate() {
            let (x, y) = (plot_right + 16, TOP + 18 * k as i32);
            root.draw(&Rectangle::new(
                [(x, y), (x + 12, y + 12)],
                COLORS[k % 8].filled(),
            ))?;
            root.draw_text(name, &text(14.0, HPos::Left, VPos::Center), (x + 18, y + 6))?;
        }
        root.present()?;
        Ok(())
    })();
    result.map_err(fail)
}

/// The file `--plot` writes and the `--compare` file it reads, if any.
#[derive(Clone, Debug)]
pub(crate) struct PlotRequest {
    /// The SVG to write.
    pub(crate) svg: PathBuf,
    /// Torch's results to draw beside ours.
    pub(crate) compare: Option<PathBuf>,
}

impl PlotRequest {
    /// Adds the torch bars and draws the chart; says on stderr when no
    /// row of the torch file matched a case.
    pub(crate) fn write(&self, title: &str, mut groups: Vec<Group>) -> Result<()> {
        if let Some(path) = &self.compare {
            if add_torch(&mut groups, path)? == 0 {
                eprintln!(
                    "note: no row of {} has the shape (BxHqxSqxSkxD) of a case of this run; \
                     the chart shows sdpa alone",
                    path.display()
                );
            }
        }
        draw(&self.svg, title, &groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(dims: &str, dtype: DType, causal: bool) -> Group {
        Group {
            label: format!("{dims} {dtype}"),
            dims: dims.into(),
            dtype,
            causal,
            bars: vec![("forward".into(), 1.5)],
        }
    }

    #[test]
    fn torch_rows_match_by_shape_and_by_dtype_and_causal_where_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torch.json");
        std::fs::write(
            &path,
            r#"[
              {"shape": "1x8x64x64x64", "backend": "flash", "ms": 1.0, "tflops": 2.0},
              {"shape": "1x8x64x64x64", "backend": "cudnn", "tflops": 3.0, "dtype": "torch.float16"},
              {"shape": "1x8x64x64x64", "gflops": 500.0, "causal": true},
              {"shape": "wan-480p", "backend": "flash", "tflops": 9.0},
              {"shape": "1x8x64x64x64", "backend": "efficient", "error": "No available kernel."}
            ]"#,
        )
        .unwrap();
        let mut groups = vec![
            group("1x8x64x64x64", DType::BF16, false),
            group("1x8x64x64x64", DType::F16, true),
        ];
        assert_eq!(add_torch(&mut groups, &path).unwrap(), 4);
        let names = |g: &Group| g.bars.iter().map(|b| b.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&groups[0]), ["forward", "torch flash"]);
        assert_eq!(
            names(&groups[1]),
            ["forward", "torch flash", "torch cudnn", "torch"]
        );
        assert_eq!(groups[1].bars[3].1, 0.5);
    }

    #[test]
    fn a_file_that_is_not_torch_results_is_a_compare_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torch.json");
        std::fs::write(&path, r#"[{"shape": "1x1x1x1x8", "backend": "flash"}]"#).unwrap();
        let err = add_torch(&mut [], &path).unwrap_err().to_string();
        assert!(err.contains("neither tflops nor gflops"), "{err}");
        std::fs::write(&path, r#"{"shape": 1}"#).unwrap();
        let err = add_torch(&mut [], &path).unwrap_err();
        assert!(matches!(err, CliError::Compare { .. }), "{err}");
    }

    #[test]
    fn axes_are_round() {
        let close = |(a, b): (f64, f64), (c, d): (f64, f64)| {
            (a - c).abs() < 1e-9 * c && (b - d).abs() < 1e-9 * d
        };
        assert!(close(axis(585.0), (600.0, 200.0)));
        assert!(close(axis(0.9), (1.0, 0.2)));
        assert!(close(axis(0.0), (1.0, 0.2)));
        assert_eq!(unit(0.2), ("GFLOP/s", 1e3));
    }
}
