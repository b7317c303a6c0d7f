//! Shared by the build scripts of every crate that links executables
//! (binaries, tests) against libtorch.
//!
//! torch-sys links libtorch from the PyPI wheel but leaves no run-time search
//! path in the final binaries; this adds an rpath to torch's `lib` folder so the
//! binaries and test executables run without LD_LIBRARY_PATH.

use std::process::Command;

/// Prints the cargo directive that adds torch's `lib` folder to the rpath.
pub fn emit_torch_rpath() {
    // The same interpreter torch-sys asks: the active virtualenv's, else python3.
    println!("cargo:rerun-if-env-changed=VIRTUAL_ENV");
    let python = if std::env::var_os("VIRTUAL_ENV").is_some() {
        "python"
    } else {
        "python3"
    };
    let script = "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))";
    let output = Command::new(python)
        .args(["-c", script])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} to find torch (run `make setup`): {e}"));
    if !output.status.success() {
        panic!(
            "{python} cannot import torch (run `make setup`): {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let lib_dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
}
