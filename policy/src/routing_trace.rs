//! `--record-routing FILE`: the experts every token chose, per step and
//! layer, as JSON lines — the input of the capacity planner.
//!
//! The first line describes the model:
//! `{"format": "tramontane-routing-v1", "model_id": "<sha256 of config.json>",
//!   "layers": L, "experts": E, "top_k": K}`;
//! then one line per (step, layer) dispatch, in order, `layer` the decoder
//! layer (a dense layer has no routed experts, and no lines):
//! `{"step": S, "layer": L, "experts": [[e, e], [e, e], ...]}` with one list
//! of K expert ids per token of the step (prefill chunks and decode tokens of
//! every running sequence, in batch order).
//!
//! The file rotates by size: at the first step that starts once it holds
//! `max_bytes`, it is renamed to `FILE.1` (replacing the one before) and a
//! new `FILE` begins with the header again. Each file is a trace of its own,
//! of whole steps, and the two together hold at most about twice
//! `max_bytes`.

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
    path: PathBuf,
    header: Header,
    /// Bytes in the current file.
    written: u64,
    max_bytes: u64,
    step: u64,
    /// The layer of the last record: a record of this layer or an earlier
    /// one starts a new step.
    last_layer: Option<usize>,
    /// The first write error; recording stops there (serving goes on).
    failed: bool,
}

impl RoutingTrace {
    /// Starts a trace at `path` (replacing what was there) that rotates
    /// once it holds `max_bytes`.
    pub fn create(path: &Path, header: &Header, max_bytes: u64) -> std::io::Result<Self> {
        let (writer, written) = start_file(path, header)?;
        Ok(Self {
            out: Mutex::new(TraceFile {
                writer,
                path: path.to_owned(),
                header: header.clone(),
                written,
                max_bytes,
                step: 0,
                last_layer: None,
                failed: false,
            }),
        })
    }

    /// Records one layer's routing: `experts` holds k ids per token, flattened.
    /// A layer at or before the last one recorded starts a new step (the
    /// first routed layer need not be layer 0).
    pub fn record(&self, layer: usize, top_k: usize, experts: &[usize]) {
        let mut file = self.out.lock().expect("routing trace lock");
        if file.failed || top_k == 0 {
            return;
        }
        let new_step = file.last_layer.is_none_or(|last| layer <= last);
        file.last_layer = Some(layer);
        if new_step {
            file.step += 1;
            if file.written >= file.max_bytes
                && let Err(error) = file.rotate()
            {
                tracing::error!(%error, "cannot rotate the routing trace; recording stops");
                file.failed = true;
                return;
            }
        }
        let record = Record {
            step: file.step,
            layer,
            experts: experts.chunks(top_k).map(<[usize]>::to_vec).collect(),
        };
        let mut line = match serde_json::to_vec(&record) {
            Ok(line) => line,
            Err(error) => {
                tracing::error!(%error, "cannot write the routing trace; recording stops");
                file.failed = true;
                return;
            }
        };
        line.push(b'\n');
        let written = file
            .writer
            .write_all(&line)
            .and_then(|()| file.writer.flush());
        file.written += line.len() as u64;
        if let Err(error) = written {
            tracing::error!(%error, "cannot write the routing trace; recording stops");
            file.failed = true;
        }
    }
}

impl TraceFile {
    /// `FILE` becomes `FILE.1`; a new `FILE` starts with the header.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.writer.flush()?;
        std::fs::rename(&self.path, rotated(&self.path))?;
        let (writer, written) = start_file(&self.path, &self.header)?;
        self.writer = writer;
        self.written = written;
        Ok(())
    }
}

/// Where the previous file of a rotating trace at `path` goes.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A new trace file with its header line; the bytes written.
fn start_file(path: &Path, header: &Header) -> std::io::Result<(BufWriter<File>, u64)> {
    let mut writer = BufWriter::new(File::create(path)?);
    let mut line = serde_json::to_vec(header)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    writer.flush()?;
    Ok((writer, line.len() as u64))
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

    fn header() -> Header {
        Header {
            format: FORMAT.into(),
            model_id: "abc".into(),
            layers: 2,
            experts: 4,
            top_k: 2,
        }
    }

    #[test]
    fn a_trace_reads_back_as_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routing.jsonl");
        let header = header();
        let trace = RoutingTrace::create(&path, &header, u64::MAX).expect("create");
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

    #[test]
    fn steps_start_at_the_first_routed_layer_when_layer_0_is_dense() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routing.jsonl");
        let header = Header {
            layers: 4,
            ..header()
        };
        let trace = RoutingTrace::create(&path, &header, u64::MAX).expect("create");
        // Layers 1 and 3 routed, 0 and 2 dense: three steps.
        for step in 0..3 {
            trace.record(1, 2, &[step, 1]);
            trace.record(3, 2, &[2, step]);
        }
        drop(trace);
        let (_, records) = read(&path).expect("read");
        let steps: Vec<(u64, usize)> = records.iter().map(|r| (r.step, r.layer)).collect();
        assert_eq!(steps, [(1, 1), (1, 3), (2, 1), (2, 3), (3, 1), (3, 3)]);
    }

    #[test]
    fn a_trace_rotates_by_size_at_step_boundaries_into_two_readable_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routing.jsonl");
        let header = header();
        let max_bytes = 600;
        let trace = RoutingTrace::create(&path, &header, max_bytes).expect("create");
        let steps = 200;
        for step in 0..steps {
            let e = step % 4;
            trace.record(0, 2, &[e, (e + 1) % 4, e, (e + 2) % 4]);
            trace.record(1, 2, &[(e + 3) % 4, e]);
        }
        drop(trace);
        let mut last_steps = Vec::new();
        for file in [rotated(&path), path.clone()] {
            let size = std::fs::metadata(&file).expect("exists").len();
            // Rotated once it held max_bytes, at the next step's start.
            assert!(size < max_bytes + 200, "{}: {size} bytes", file.display());
            let (read_header, records) = read(&file).expect("each file is a trace");
            assert_eq!(read_header, header);
            // Whole steps only: each starts at layer 0 and has both layers.
            assert_eq!(records.len() % 2, 0);
            assert!(
                records
                    .chunks(2)
                    .all(|s| s[0].layer == 0 && s[1].layer == 1 && s[0].step == s[1].step)
            );
            last_steps.push(records.last().expect("records").step);
        }
        assert_eq!(last_steps[1], steps as u64);
        assert!(last_steps[0] < last_steps[1]);
        assert!(!dir.path().join("routing.jsonl.2").exists());
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 2);
    }
}
