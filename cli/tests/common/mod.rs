//! Shared by the integration tests: the real `tramontane` binary, the
//! project's Python (transformers), and checkpoints generated on the fly.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};

pub fn tramontane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tramontane"))
}

/// The Python with transformers: the active virtualenv's, else the project's `.venv`.
pub fn python() -> PathBuf {
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        return PathBuf::from(venv).join("bin/python");
    }
    let project = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if project.exists() {
        project
    } else {
        PathBuf::from("python3")
    }
}

pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts")
}

pub fn run_ok(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// Writes a checkpoint with `tramontane gen-model --out DIR ARGS...`.
pub fn gen_model(dir: &Path, args: &[&str]) -> Result<()> {
    run_ok(
        tramontane()
            .arg("gen-model")
            .arg("--out")
            .arg(dir)
            .args(args),
    )?;
    Ok(())
}
