//! Parquet inputs (what Hugging Face `datasets` stores and the Hub serves): rows read one row
//! group at a time, each row as a JSON record, so a text column and nested chat columns read the
//! same way as JSONL.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::inputs::{Found, Input};

/// Call `f` with each row of a Parquet file, as a JSON object, and where it is.
pub(crate) fn for_each_row(
    input: &Input,
    read: &Arc<AtomicU64>,
    f: &mut dyn FnMut(Found, &str) -> Result<(), String>,
) -> Result<(), String> {
    let name = input.path.display();
    let file = File::open(&input.path).map_err(|e| format!("cannot read {name}: {e}"))?;
    let reader = SerializedFileReader::new(file).map_err(|e| format!("{name} is not a readable Parquet file: {e}"))?;
    let mut row_number = 0;
    for group in 0..reader.num_row_groups() {
        let row_group = reader.get_row_group(group).map_err(|e| format!("{name}: row group {group}: {e}"))?;
        let rows = row_group.get_row_iter(None).map_err(|e| format!("{name}: row group {group}: {e}"))?;
        for row in rows {
            row_number += 1;
            let row = row.map_err(|e| format!("{name}: row {row_number}: {e}"))?;
            f(Ok(row.to_json_value()), &format!("{name} row {row_number}"))?;
        }
        read.fetch_add(row_group.metadata().compressed_size().max(0) as u64, Ordering::Relaxed);
    }
    Ok(())
}
