//! One `log` call per logging step fans out to the sinks: console/progress bar, metrics.jsonl,
//! TensorBoard. Values are plain f64 read back from the device only when logging.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::tensorboard::EventWriter;

pub struct Metrics {
    jsonl: Option<File>,
    tensorboard: Option<EventWriter>,
    progress: ProgressBar,
}

impl Metrics {
    pub fn new(out: &Path, jsonl: bool, tensorboard: bool, progress: bool, total_steps: usize, start_step: usize) -> Result<Self> {
        let jsonl = if jsonl {
            let path = out.join("metrics.jsonl");
            Some(OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?)
        } else {
            None
        };
        let tensorboard = if tensorboard {
            Some(EventWriter::create(&out.join("tb")).with_context(|| format!("cannot write TensorBoard events under {}", out.display()))?)
        } else {
            None
        };
        let bar = ProgressBar::new(total_steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        if !progress {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_position(start_step as u64);
        Ok(Self { jsonl, tensorboard, progress: bar })
    }

    /// Record one step's values everywhere.
    pub fn log(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        if let Some(file) = &mut self.jsonl {
            let mut line = format!("{{\"step\": {step}");
            for (key, value) in values {
                let json = serde_json::Number::from_f64(*value).map_or("null".to_string(), |n| n.to_string());
                line.push_str(&format!(", \"{key}\": {json}"));
            }
            line.push_str("}\n");
            file.write_all(line.as_bytes())?;
            file.flush()?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(step, values)?;
        }
        Ok(())
    }

    /// fp16-mixed: `step` overflowed and was skipped; the loss scale is now `scale`.
    pub fn log_skip(&mut self, step: usize, scale: f64) -> Result<()> {
        if let Some(file) = &mut self.jsonl {
            file.write_all(format!("{{\"step\": {step}, \"skipped\": true, \"loss_scale\": {scale}}}\n").as_bytes())?;
            file.flush()?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(step, &[("loss_scale", scale)])?;
        }
        Ok(())
    }

    pub fn advance(&self, step: usize, message: String) {
        self.progress.set_position(step as u64);
        self.progress.set_message(message);
    }

    /// A line above the progress bar (or plainly, when there is no terminal).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.progress.is_hidden() {
            println!("{}", line.as_ref());
        } else {
            self.progress.println(line.as_ref());
        }
    }

    pub fn finish(&self) {
        self.progress.finish_and_clear();
    }
}
