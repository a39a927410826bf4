//! TensorBoard event files written directly: `Event` protos (prost) in TFRecord framing
//! (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "EventWhat", tags = "3, 5, 7")]
    what: Option<EventWhat>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum EventWhat {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// TensorBoard's `SessionLog`: a START at step N makes its readers drop the events of earlier
/// files at steps ≥ N (what a resumed run logs again).
#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SESSION_START: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, tag = "2")]
    simple_value: f32,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

pub struct EventWriter {
    file: File,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

impl EventWriter {
    /// A new event file in `dir` (one per process start, as TensorBoard expects); a run resumed
    /// at `resumed_at` marks the restart so the steps it logs again replace the old ones.
    pub fn create(dir: &Path, resumed_at: Option<usize>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "furnace".into());
        let name = format!("events.out.tfevents.{}.{host}.{}", now() as u64, std::process::id());
        let file = OpenOptions::new().create(true).append(true).open(dir.join(name))?;
        let mut writer = Self { file };
        writer.write(&Event { wall_time: now(), step: 0, what: Some(EventWhat::FileVersion("brain.Event:2".into())) })?;
        if let Some(step) = resumed_at {
            let start = EventWhat::SessionLog(SessionLog { status: SESSION_START });
            writer.write(&Event { wall_time: now(), step: step as i64 + 1, what: Some(start) })?;
        }
        Ok(writer)
    }

    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> std::io::Result<()> {
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue { tag: tag.to_string(), simple_value: *v as f32 })
            .collect();
        self.write(&Event { wall_time: now(), step: step as i64, what: Some(EventWhat::Summary(Summary { value })) })
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let payload = prost::Message::encode_to_vec(event);
        let len = (payload.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(payload.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&payload);
        record.extend_from_slice(&masked_crc(&payload).to_le_bytes());
        self.file.write_all(&record)?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_the_castagnoli_polynomial() {
        // The standard check value of CRC-32C; the full framing is checked by Python's
        // tensorboard reader in tests/cli.rs.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(masked_crc(b""), 0u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }
}
