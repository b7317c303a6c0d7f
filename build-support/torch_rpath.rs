//! Build script of crates whose only build step is the libtorch rpath.

#[path = "rpath.rs"]
mod rpath;

fn main() {
    rpath::emit_torch_rpath();
}
