//! `--record-routing FILE`: the experts every token chose, per step and
//! layer, as JSON lines — the input of the capacity planner.
//!
//! The first line describes the model:
//! `{"format": "tramontane-routing-v1", "model_id": "<sha256 of config.json>",
//!   "layers": L, "experts": E, "top_k": K}`;
//! then one line per (step, layer) dispatch, in order:
//! `{"step": S, "layer": L, "experts": [[e, e], [e, e], ...]}` with one list
//! of K expert ids per token of the step (prefill chunks and decode tokens of
//! every running sequence, in batch order).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "tramontane-routing-v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Header {
    pub format: String,
    pub model_id: String,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub step: u64,
    pub layer: usize,
    pub experts: Vec<Vec<usize>>,
}

pub struct RoutingTrace {
    out: Mutex<TraceFile>,
}

struct TraceFile {
    writer: BufWriter<File>,
    step: u64,
    /// The first write error; recording stops there (serving goes on).
    failed: bool,
}

impl RoutingTrace {
    pub fn create(path: &Path, header: &Header) -> std::io::Result<Self> {
        let mut writer = BufWriter::new(File::create(path)?);
        serde_json::to_writer(&mut writer, header)?;
        writer.write_all(b"\n")?;
        writer.flush()?;
        Ok(Self {
            out: Mutex::new(TraceFile {
                writer,
                step: 0,
                failed: false,
            }),
        })
    }

    /// Records one layer's routing: `experts` holds k ids per token, flattened.
    /// Layer 0 starts a new step.
    pub fn record(&self, layer: usize, top_k: usize, experts: &[usize]) {
        let mut file = self.out.lock().expect("routing trace lock");
        if file.failed || top_k == 0 {
            return;
        }
        if layer == 0 {
            file.step += 1;
        }
        let record = Record {
            step: file.step,
            layer,
            experts: experts.chunks(top_k).map(<[usize]>::to_vec).collect(),
        };
        let written = serde_json::to_writer(&mut file.writer, &record)
            .map_err(std::io::Error::from)
            .and_then(|()| file.writer.write_all(b"\n"))
            .and_then(|()| file.writer.flush());
        if let Err(error) = written {
            tracing::error!(%error, "cannot write the routing trace; recording stops");
            file.failed = true;
        }
    }
}

/// Why a trace cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: empty", path.display())]
    Empty { path: PathBuf },
    #[error("{} line 1: not a routing trace header: {error}", path.display())]
    Header {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{}: format {found:?}, expected {FORMAT:?}", path.display())]
    Format { path: PathBuf, found: String },
    #[error("{} line {line}: {error}", path.display())]
    Record {
        path: PathBuf,
        line: usize,
        error: serde_json::Error,
    },
}

/// Reads a trace: its header and records.
pub fn read(path: &Path) -> Result<(Header, Vec<Record>), TraceError> {
    let text = std::fs::read_to_string(path).map_err(|error| TraceError::Read {
        path: path.to_owned(),
        error,
    })?;
    let mut lines = text.lines().enumerate();
    let (_, first) = lines.next().ok_or_else(|| TraceError::Empty {
        path: path.to_owned(),
    })?;
    let header: Header = serde_json::from_str(first).map_err(|error| TraceError::Header {
        path: path.to_owned(),
        error,
    })?;
    if header.format != FORMAT {
        return Err(TraceError::Format {
            path: path.to_owned(),
            found: header.format,
        });
    }
    let records = lines
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|error| TraceError::Record {
                path: path.to_owned(),
                line: i + 1,
                error,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((header, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_reads_back_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routing.jsonl");
        let header = Header {
            format: FORMAT.into(),
            model_id: "abc".into(),
            layers: 2,
            experts: 4,
            top_k: 2,
        };
        let trace = RoutingTrace::create(&path, &header).expect("create");
        trace.record(0, 2, &[0, 1, 2, 3]);
        trace.record(1, 2, &[1, 0, 3, 2]);
        trace.record(0, 2, &[3, 1]);
        drop(trace);
        let (read_header, records) = read(&path).expect("read");
        assert_eq!(read_header, header);
        assert_eq!(
            records,
            [
                Record {
                    step: 1,
                    layer: 0,
                    experts: vec![vec![0, 1], vec![2, 3]]
                },
                Record {
                    step: 1,
                    layer: 1,
                    experts: vec![vec![1, 0], vec![3, 2]]
                },
                Record {
                    step: 2,
                    layer: 0,
                    experts: vec![vec![3, 1]]
                },
            ]
        );
    }
}
