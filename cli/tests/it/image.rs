//! The container image's recipe (deploy/Dockerfile; no image can be built
//! here): hadolint finds nothing, and it builds what `make build` builds,
//! against the torch that requirements.txt pins.

use anyhow::{Context, Result, ensure};

use crate::support;

fn repo_file(path: &str) -> Result<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(path)).with_context(|| path.to_string())
}

#[test]
fn the_dockerfile_lints_clean_and_builds_against_the_pinned_torch() -> Result<()> {
    let dockerfile = repo_file("deploy/Dockerfile")?;
    let hadolint = support::python()
        .parent()
        .context("the virtualenv's bin folder")?
        .join("hadolint");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    support::run_ok(
        std::process::Command::new(&hadolint)
            .arg("deploy/Dockerfile")
            .current_dir(&root),
    )?;

    let pinned = repo_file("requirements.txt")?
        .lines()
        .find_map(|l| l.strip_prefix("torch=="))
        .context("torch pin in requirements.txt")?
        .trim()
        .to_string();
    ensure!(
        dockerfile.contains(&format!("ARG TORCH_VERSION={pinned}")),
        "deploy/Dockerfile does not build against torch {pinned}"
    );
    // The Makefile's build command, for the one binary.
    let makefile = repo_file("Makefile")?;
    ensure!(makefile.contains("cargo build --release --locked"));
    ensure!(
        dockerfile
            .matches("cargo build --release --locked -p tramontane")
            .count()
            == 2,
        "both images build the binary as `make build` does"
    );
    // Both images run the binary from where it was staged.
    for target in ["AS cuda", "AS cpu"] {
        ensure!(dockerfile.contains(target), "no {target} stage");
    }
    ensure!(
        dockerfile
            .matches(r#"ENTRYPOINT ["/usr/local/bin/tramontane"]"#)
            .count()
            == 2,
        "an image without the binary as its entrypoint"
    );
    Ok(())
}
