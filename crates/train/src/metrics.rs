//! `metrics.jsonl` (one JSON object per step or eval), peak memory, and the loss curve PNG.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding included) through forward + backward per second.
    pub tokens_per_s: f64,
    pub target_tokens: usize,
    pub step_seconds: f64,
    /// Peak resident memory of the process so far (VmHWM).
    pub peak_rss_mib: f64,
    pub paged_in_bytes: u64,
    pub paged_out_bytes: u64,
    pub optimizer_state_bytes: u64,
    /// Bytes read back from the training device during the step (scalars only: the loss and the grad norm).
    #[serde(default)]
    pub readback_bytes: u64,
    pub epoch: f64,
}

/// The metrics file, appended to line by line (flushed each line).
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

#[derive(Serialize, Deserialize)]
struct Line {
    kind: String,
    step: u64,
}

impl MetricsLog {
    /// Opens `path` keeping only the lines of steps ≤ `keep_through` (a resumed run drops what came after its
    /// checkpoint, so the file reads as one uninterrupted run); 0 starts a fresh file.
    pub fn open(path: &Path, keep_through: u64) -> Result<Self, TrainError> {
        let kept: String = if keep_through > 0 && path.exists() {
            let text =
                std::fs::read_to_string(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
            text.lines()
                .filter(|l| serde_json::from_str::<Line>(l).is_ok_and(|m| m.step <= keep_through))
                .map(|l| format!("{l}\n"))
                .collect()
        } else {
            String::new()
        };
        quant::checkpoint::write_atomically(path, kept.as_bytes())?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{value}")
            .and_then(|_| self.file.flush())
            .map_err(|source| TrainError::Io { path: self.path.clone(), source })
    }

    pub fn step(&mut self, m: &StepMetrics) -> Result<(), TrainError> {
        let mut value = serde_json::to_value(m).expect("metrics serialize");
        value["kind"] = "train".into();
        self.write(value)
    }

    pub fn eval(&mut self, step: u64, loss: f64) -> Result<(), TrainError> {
        self.write(serde_json::json!({"kind": "eval", "step": step, "eval_loss": loss, "eval_perplexity": loss.exp()}))
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; 0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM:")
}

/// Current resident set size of this process in MiB (Linux `VmRSS`; 0 where unavailable).
pub fn rss_mib() -> f64 {
    proc_status_mib("VmRSS:")
}

fn proc_status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Resets the peak resident set size to the current one (Linux `clear_refs`), so that a later
/// [`peak_rss_mib`] measures only what ran after; false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `(step, loss)` points of one curve.
pub type LossCurve = Vec<(f64, f64)>;

/// Training and eval losses from a metrics file.
pub fn read_losses(metrics: &Path) -> Result<(LossCurve, LossCurve), TrainError> {
    let text =
        std::fs::read_to_string(metrics).map_err(|source| TrainError::Io { path: metrics.to_path_buf(), source })?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let step = v["step"].as_f64().unwrap_or(0.0);
        match v["kind"].as_str() {
            Some("train") => train.extend(v["loss"].as_f64().map(|l| (step, l))),
            Some("eval") => eval.extend(v["eval_loss"].as_f64().map(|l| (step, l))),
            _ => {}
        }
    }
    Ok((train, eval))
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Draws the training (and eval) loss curves from `metrics` into a PNG at `png`.
pub fn plot_losses(metrics: &Path, png: &Path) -> Result<PathBuf, TrainError> {
    use plotters::prelude::*;
    let (train, eval) = read_losses(metrics)?;
    if train.is_empty() {
        return Err(TrainError::Input("no training steps to plot".into()));
    }
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let err = |e: &dyn std::fmt::Display| TrainError::Input(format!("drawing {}: {e}", png.display()));
    // The encoder picks the format from the extension, so the temporary file keeps `.png`.
    let tmp = png
        .with_file_name(format!(".{}.partial.png", png.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default()));
    {
        let root = BitMapBackend::new(&tmp, (900, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let max_step = train.iter().chain(&eval).map(|p| p.0).fold(1.0, f64::max);
        let losses = train.iter().chain(&eval).map(|p| p.1).filter(|l| l.is_finite());
        let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| (lo.min(l), hi.max(l)));
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption("QLoRA loss", ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("optimizer step").y_desc("loss").draw().map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), &BLUE))
            .map_err(|e| err(&e))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(eval.iter().copied(), RED.stroke_width(2)).point_size(3))
                .map_err(|e| err(&e))?
                .label("held-out")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    std::fs::rename(&tmp, png).map_err(|source| TrainError::Io { path: png.to_path_buf(), source })?;
    Ok(png.to_path_buf())
}

/// Draws one point with a vertical interval per entry `(name, value, low, high)`, left to right in the
/// given order, into a PNG at `png` (`qlora judge elo`).
pub fn plot_intervals(points: &[(&str, f64, f64, f64)], png: &Path, title: &str) -> Result<PathBuf, TrainError> {
    use plotters::prelude::*;
    if points.is_empty() {
        return Err(TrainError::Input("nothing to plot".into()));
    }
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let err = |e: &dyn std::fmt::Display| TrainError::Input(format!("drawing {}: {e}", png.display()));
    let tmp = png
        .with_file_name(format!(".{}.partial.png", png.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default()));
    {
        let width = (160 * points.len() as u32 + 160).clamp(640, 2400);
        let root = BitMapBackend::new(&tmp, (width, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let values = points.iter().flat_map(|p| [p.1, p.2, p.3]).filter(|v| v.is_finite());
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let pad = ((hi - lo) * 0.1).max(5.0);
        let n = points.len();
        let names: Vec<String> = points.iter().map(|p| p.0.to_string()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..(n as f64 - 0.5), (lo - pad)..(hi + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_desc("rating")
            .draw()
            .map_err(|e| err(&e))?;
        for (i, &(_, value, low, high)) in points.iter().enumerate() {
            let x = i as f64;
            let bar = [(x, low), (x, high)];
            chart
                .draw_series(std::iter::once(PathElement::new(bar.to_vec(), BLUE.stroke_width(2))))
                .map_err(|e| err(&e))?;
            for cap in [low, high] {
                let line = vec![(x - 0.08, cap), (x + 0.08, cap)];
                chart
                    .draw_series(std::iter::once(PathElement::new(line, BLUE.stroke_width(2))))
                    .map_err(|e| err(&e))?;
            }
            chart.draw_series(std::iter::once(Circle::new((x, value), 5, BLUE.filled()))).map_err(|e| err(&e))?;
            chart
                .draw_series(std::iter::once(Text::new(format!("{value:.0}"), (x + 0.1, value), ("sans-serif", 16))))
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    std::fs::rename(&tmp, png).map_err(|source| TrainError::Io { path: png.to_path_buf(), source })?;
    Ok(png.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dashboard::line::{MetricsLine, parse_line};

    /// The dashboard reads every value the trainer writes (`qlora dashboard` parses these lines itself).
    #[test]
    fn the_dashboard_reads_what_the_log_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        let m = StepMetrics {
            step: 3,
            loss: 1.25,
            lr: 2e-4,
            grad_norm: 0.5,
            tokens_per_s: 812.5,
            target_tokens: 90,
            step_seconds: 4.5,
            peak_rss_mib: 2750.0,
            paged_in_bytes: 11,
            paged_out_bytes: 12,
            optimizer_state_bytes: 13,
            readback_bytes: 8,
            epoch: 0.25,
        };
        log.step(&m).unwrap();
        log.eval(3, 2.0).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<MetricsLine> = text.lines().map(|l| parse_line(l.as_bytes()).unwrap()).collect();
        let MetricsLine::Train(t) = &lines[0] else { panic!("{:?}", lines[0]) };
        assert_eq!(
            (t.step, t.loss, t.lr, t.grad_norm, t.tokens_per_s, t.step_seconds, t.peak_rss_mib),
            (3, Some(1.25), Some(2e-4), Some(0.5), Some(812.5), Some(4.5), Some(2750.0))
        );
        assert_eq!(
            (t.paged_in_bytes, t.paged_out_bytes, t.optimizer_state_bytes, t.epoch),
            (Some(11.0), Some(12.0), Some(13.0), Some(0.25))
        );
        let MetricsLine::Eval(e) = &lines[1] else { panic!("{:?}", lines[1]) };
        assert_eq!((e.step, e.loss, e.perplexity), (3, Some(2.0), Some(2f64.exp())));
    }
}
