//! `metrics.jsonl` (one JSON object per logged step or evaluation) and the `loss.svg` plot.

use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Record {
    /// Optimizer steps completed.
    pub step: u64,
    /// Mean training loss since the previous logged step (training lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Mean validation loss (evaluation lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Validation perplexity, `exp(val_loss)` (evaluation lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_ppl: Option<f64>,
    /// Learning rate of the step (training lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Global gradient norm before clipping (training lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Data tokens consumed so far (padding excluded).
    pub tokens: u64,
    /// Data tokens per second since the previous logged step (training lines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
    /// Seconds spent training so far, across resumes.
    pub elapsed: f64,
}

/// The metrics of a run: kept in memory for the plot, appended to disk as they come.
pub struct Metrics {
    /// The file records are appended to; `None` keeps them in memory only.
    path: Option<PathBuf>,
    records: Vec<Record>,
}

impl Metrics {
    /// Opens `path`, keeping only records up to `resume_step` (a resumed run rewrites what
    /// came after its checkpoint). The lines kept are kept as they were written, byte for byte.
    pub fn open(path: &Path, resume_step: Option<u64>) -> std::io::Result<Self> {
        let (mut records, mut text) = (Vec::new(), String::new());
        if let (Some(step), Ok(old)) = (resume_step, std::fs::read_to_string(path)) {
            for line in old.lines() {
                let Ok(record) = serde_json::from_str::<Record>(line) else {
                    continue;
                };
                if record.step <= step {
                    text.push_str(line);
                    text.push('\n');
                    records.push(record);
                }
            }
        }
        model::weights::write_atomic(path, text.as_bytes())?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            records,
        })
    }

    /// Records kept in memory only (a rank of a multi-process run other than rank 0, which
    /// writes the file).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            records: Vec::new(),
        }
    }

    /// Appends a record.
    pub fn push(&mut self, record: Record) -> std::io::Result<()> {
        if let Some(path) = &self.path {
            let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
            writeln!(
                file,
                "{}",
                serde_json::to_string(&record).unwrap_or_default()
            )?;
        }
        self.records.push(record);
        Ok(())
    }

    /// All records so far.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Draws training and validation loss (top) and the learning rate (bottom) to `path`.
    pub fn plot(&self, path: &Path) -> Result<(), String> {
        let train: Vec<(f64, f64)> = self
            .records
            .iter()
            .filter_map(|r| Some((r.step as f64, r.loss?)))
            .collect();
        let val: Vec<(f64, f64)> = self
            .records
            .iter()
            .filter_map(|r| Some((r.step as f64, r.val_loss?)))
            .collect();
        let lr: Vec<(f64, f64)> = self
            .records
            .iter()
            .filter_map(|r| Some((r.step as f64, r.lr?)))
            .collect();
        if train.is_empty() {
            return Ok(());
        }
        let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(420);
        let max_step = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
        let losses = train.iter().chain(&val).map(|p| p.1);
        let (lo, hi) = losses.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let mut chart = ChartBuilder::on(&top)
            .caption("loss", ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..max_step, (lo * 0.95)..(hi * 1.05))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(train, &BLUE))
            .map_err(|e| e.to_string())?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(LineSeries::new(val, RED.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        let max_lr = lr.iter().map(|p| p.1).fold(1e-12, f64::max);
        let mut chart = ChartBuilder::on(&bottom)
            .caption("learning rate", ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..max_step, 0f64..max_lr * 1.05)
            .map_err(|e| e.to_string())?;
        chart.configure_mesh().draw().map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(lr, &GREEN))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_keeps_earlier_lines_byte_for_byte_and_drops_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        // 0.1 + 0.2 prints with 17 digits; "1.50" is how another writer might spell 1.5.
        let kept = "{\"step\":1,\"loss\":0.30000000000000004,\"tokens\":8,\"elapsed\":1.50}\n\
                    {\"step\":2,\"loss\":2.0,\"tokens\":16,\"elapsed\":3e0}\n";
        let dropped = "{\"step\":3,\"loss\":1.0,\"tokens\":24,\"elapsed\":4.0}\n";
        std::fs::write(&path, format!("{kept}{dropped}")).unwrap();
        let metrics = Metrics::open(&path, Some(2)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), kept);
        assert_eq!(metrics.records().len(), 2);
        assert_eq!(metrics.records()[0].loss, Some(0.1 + 0.2));
    }
}
