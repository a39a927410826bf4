//! One `log` call per logging step fans out to the sinks: console/progress bar, metrics.jsonl,
//! TensorBoard. Values are plain f64 read back from the device only when logging.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use furnace_core::fsutil::atomic_write;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::tensorboard::EventWriter;

/// Drop the lines of metrics.jsonl logged after `step` (atomically: the file is whole either way).
fn truncate_after(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|line| {
            let logged = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64());
            logged.is_none_or(|s| s <= step as u64)
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    if kept.len() != text.len() {
        atomic_write(path, kept.as_bytes()).with_context(|| format!("cannot rewrite {}", path.display()))?;
    }
    Ok(())
}

pub struct Metrics {
    jsonl: Option<File>,
    tensorboard: Option<EventWriter>,
    progress: ProgressBar,
}

impl Metrics {
    /// The sinks of a run starting at `start_step` (0, or the step a resume continues from:
    /// what was logged after it is logged again, so metrics.jsonl is cut back to it and
    /// TensorBoard told of the restart).
    pub fn new(out: &Path, jsonl: bool, tensorboard: bool, progress: bool, total_steps: usize, start_step: usize) -> Result<Self> {
        let resumed_at = (start_step > 0).then_some(start_step);
        let jsonl = if jsonl {
            let path = out.join("metrics.jsonl");
            if let Some(step) = resumed_at {
                truncate_after(&path, step)?;
            }
            Some(OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?)
        } else {
            None
        };
        let tensorboard = if tensorboard {
            let writer = EventWriter::create(&out.join("tb"), resumed_at);
            Some(writer.with_context(|| format!("cannot write TensorBoard events under {}", out.display()))?)
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
            file.write_all(line.as_bytes()).and_then(|_| file.flush()).context("cannot append to metrics.jsonl")?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(step, values).context("cannot append to the TensorBoard events file")?;
        }
        Ok(())
    }

    /// fp16-mixed: `step` overflowed and was skipped; the loss scale is now `scale`.
    pub fn log_skip(&mut self, step: usize, scale: f64) -> Result<()> {
        if let Some(file) = &mut self.jsonl {
            let line = format!("{{\"step\": {step}, \"skipped\": true, \"loss_scale\": {scale}}}\n");
            file.write_all(line.as_bytes()).and_then(|_| file.flush()).context("cannot append to metrics.jsonl")?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(step, &[("loss_scale", scale)]).context("cannot append to the TensorBoard events file")?;
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

/// Metrics summed since the last log line (or over an evaluation), by name: each mode adds
/// what it measures and turns the sums into means when it logs. Every rank adds the same
/// names, so the ranks' totals are one buffer summed in name order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sums(BTreeMap<String, f64>);

impl Sums {
    pub fn add(&mut self, name: &str, value: f64) {
        *self.0.entry(name.to_string()).or_default() += value;
    }

    /// The sum of `name`; 0 when nothing was added under it.
    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn merge(&mut self, other: &Sums) {
        for (name, value) in &other.0 {
            self.add(name, *value);
        }
    }

    /// `name`'s sum per unit of `count`'s: a mean, 0 over nothing.
    pub fn per(&self, name: &str, count: &str) -> f64 {
        self.get(name) / self.get(count).max(1.0)
    }

    /// The names under `prefix` (in name order), with their sums.
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0.iter().filter(move |(name, _)| name.starts_with(prefix)).map(|(name, value)| (name.as_str(), *value))
    }

    /// The totals over every rank; `sum` adds a buffer over ranks (every rank calls it).
    pub fn summed_over_ranks(mut self, sum: impl FnOnce(&mut [f64])) -> Self {
        let mut values: Vec<f64> = self.0.values().copied().collect();
        if !values.is_empty() {
            sum(&mut values);
        }
        self.0.values_mut().zip(values).for_each(|(total, value)| *total = value);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::Sums;

    #[test]
    fn sums_add_merge_and_reduce_in_name_order() {
        let mut a = Sums::default();
        a.add("pairs", 2.0);
        a.add("loss", 1.5);
        let mut b = Sums::default();
        b.add("loss", 0.5);
        b.add("pairs", 2.0);
        a.merge(&b);
        assert_eq!((a.get("loss"), a.get("pairs"), a.per("loss", "pairs"), a.get("absent")), (2.0, 4.0, 0.5, 0.0));
        // Two ranks holding the same sums: the buffer goes over in name order (loss, pairs).
        let mut seen = Vec::new();
        let total = a.summed_over_ranks(|values| {
            seen = values.to_vec();
            values.iter_mut().for_each(|v| *v *= 2.0);
        });
        assert_eq!(seen, [2.0, 4.0]);
        assert_eq!((total.get("loss"), total.get("pairs")), (4.0, 8.0));
        assert_eq!(Sums::default().per("loss", "pairs"), 0.0);
    }
}
