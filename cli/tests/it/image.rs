//! The container image (deploy/Dockerfile): hadolint finds nothing, it
//! builds what `make build` builds against the torch that requirements.txt
//! pins, and its CPU image, built with podman from this checkout's binary,
//! serves the in-process tokens.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::support;

const PROMPT: &str = "The wind from the north crosses the mountains and";

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

/// podman, on storage of its own under target/image: vfs (no overlay
/// mounts needed) and runc.
struct Podman {
    root: PathBuf,
}

impl Podman {
    fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        command
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let output = support::run_ok(self.command().args(args))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `podman run --rm` with the host's network and rlimits a process
    /// without CAP_SYS_RESOURCE may set (podman's defaults raise them to
    /// the maximum).
    fn run_image(&self, name: &str, volumes: &[String]) -> Command {
        let mut command = self.command();
        command.args(["run", "--rm", "--pull=never", "--network", "host"]);
        command.args(["--name", name]);
        command.args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ]);
        for volume in volumes {
            command.args(["--volume", volume]);
        }
        command.arg(IMAGE);
        command
    }
}

/// The images a run makes from this checkout, removed when the test ends
/// (vfs keeps each layer whole: about a gigabyte each); the base stays.
struct Made<'a>(&'a Podman);

impl Drop for Made<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .command()
            .args(["rmi", "--force", "--ignore", IMAGE, STAGE])
            .output();
        let _ = self
            .0
            .command()
            .args(["image", "prune", "--force"])
            .output();
    }
}

/// A container that is removed when the test ends, passed or not.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .command()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

const BASE: &str = "docker.io/library/debian:bookworm-slim";
const STAGE: &str = "localhost/tramontane-stage:test";
const IMAGE: &str = "localhost/tramontane:test-cpu";

/// Why no image can be built and run here, if none can: podman, runc and
/// debootstrap (which `make test` installs) and root are needed.
fn cannot_build_images() -> Option<String> {
    for tool in ["podman", "runc", "debootstrap", "tar", "ldd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is not installed (`make test` installs it)"));
        }
    }
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("podman here needs root (no rootless setup)".into());
    }
    None
}

/// The Dockerfile's `cpu` base, `debian:bookworm-slim`, made from Debian's
/// packages (debootstrap's minimal variant), since no image registry is
/// reachable here; kept in the storage between runs.
fn base_image(podman: &Podman, work: &Path) -> Result<Option<String>> {
    if podman
        .command()
        .args(["image", "exists", BASE])
        .status()?
        .success()
    {
        return Ok(None);
    }
    let rootfs = work.join("rootfs");
    let debootstrap = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&rootfs)
        .arg("http://deb.debian.org/debian")
        .output()?;
    if !debootstrap.status.success() {
        return Ok(Some(format!(
            "debootstrap could not make a Debian base: {}",
            String::from_utf8_lossy(&debootstrap.stderr).trim()
        )));
    }
    let tarball = work.join("rootfs.tar");
    support::run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tarball)
            .arg("."),
    )?;
    podman.run(&["import", tarball.to_str().context("path")?, BASE])?;
    Ok(None)
}

/// The libraries `binary` loads from outside the system's folders (torch's),
/// as the dynamic loader resolves them.
fn bundled_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = support::run_ok(Command::new("ldd").arg(binary))?;
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((_, resolved)) = line.split_once(" => ") else {
            continue;
        };
        let path = resolved.split(" (").next().unwrap_or("").trim();
        ensure!(!path.is_empty() && path != "not found", "ldd: {line}");
        let system = ["/lib/", "/lib64/", "/usr/lib/"]
            .iter()
            .any(|dir| path.starts_with(dir));
        if !system {
            libraries.push(std::fs::canonicalize(path).with_context(|| path.to_string())?);
        }
    }
    ensure!(
        libraries.iter().any(|l| l.ends_with("libtorch_cpu.so")),
        "no libtorch_cpu.so among {libraries:?}"
    );
    Ok(libraries)
}

/// An image holding `/stage` as the Dockerfile's build stages leave it:
/// the binary at /usr/local/bin and the libraries it loads at their paths
/// (the binary's rpath names the torch wheel's lib folder of the build).
fn stage_image(podman: &Podman, work: &Path) -> Result<()> {
    let binary = Path::new(env!("CARGO_BIN_EXE_tramontane"));
    let stage = work.join("stage");
    let mut files = vec![(
        binary.to_path_buf(),
        PathBuf::from("usr/local/bin/tramontane"),
    )];
    for library in bundled_libraries(binary)? {
        let inside = library.strip_prefix("/")?.to_path_buf();
        files.push((library, inside));
    }
    for (from, inside) in &files {
        let to = stage.join("stage").join(inside);
        std::fs::create_dir_all(to.parent().context("parent")?)?;
        if std::fs::hard_link(from, &to).is_err() {
            std::fs::copy(from, &to).with_context(|| format!("{}", from.display()))?;
        }
    }
    let tarball = work.join("stage.tar");
    support::run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&stage)
            .arg("-cf")
            .arg(&tarball)
            .arg("stage"),
    )?;
    podman.run(&["import", tarball.to_str().context("path")?, STAGE])?;
    Ok(())
}

#[test]
fn the_cpu_image_runs_the_binary_make_build_built_and_serves_its_tokens() -> Result<()> {
    if let Some(why) = cannot_build_images() {
        eprintln!("the image is not built here: {why}; the Dockerfile is still linted");
        return Ok(());
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let podman = Podman {
        root: repo.join("target/image"),
    };
    let work = tempfile::tempdir()?;
    if let Some(why) = base_image(&podman, work.path())? {
        eprintln!("the image is not built here: {why}; the Dockerfile is still linted");
        return Ok(());
    }

    // The Dockerfile's own `cpu` target, its build stage given as an image
    // of this checkout's binary (no registry serves the build stages' bases
    // here, nor the CPU wheel's index).
    let _made = Made(&podman);
    stage_image(&podman, work.path())?;
    let context = work.path().join("context");
    std::fs::create_dir(&context)?;
    podman.run(&[
        "build",
        "--pull=never",
        "--quiet",
        "--file",
        repo.join("deploy/Dockerfile").to_str().context("path")?,
        "--target",
        "cpu",
        "--build-arg",
        &format!("CPU_STAGE={STAGE}"),
        "--tag",
        IMAGE,
        context.to_str().context("path")?,
    ])?;
    let config = podman.run(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}} {{json .Config.Entrypoint}} {{json .Config.Cmd}}",
        IMAGE,
    ])?;
    ensure!(
        config.trim() == r#"65532:65532 ["/usr/local/bin/tramontane"] ["--help"]"#,
        "the image's configuration: {config}"
    );

    // Its default command: the binary starts, its libraries found.
    let name = format!("tramontane-image-test-{}", std::process::id());
    let help = support::run_ok(&mut podman.run_image(&name, &[]))?;
    let help = String::from_utf8_lossy(&help.stdout);
    ensure!(help.contains("Usage:") && help.contains("serve"), "{help}");

    // Serving a checkpoint mounted read-only, as the chart mounts it, as the
    // image's unprivileged user: the tokens the binary computes in process.
    let model = work.path().join("model");
    support::gen_model(&model, &["--preset", "tiny", "--seed", "13"])?;
    {
        // The temporary folder's 0700 would hide the checkpoint's.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let (_, expected) = support::expected_greedy(&model, PROMPT, 12)?;
    let _container = Container {
        podman: &podman,
        name: name.clone(),
    };
    let serving = support::spawn_serving_command(
        podman.run_image(&name, &[format!("{}:/model:ro", model.display())]),
        &[
            "serve",
            "--model",
            "/model",
            "--workers",
            "2",
            "--threads",
            "1",
        ],
    )?;
    let tokens = support::generated_ids(&serving.process.addr, PROMPT, 12)?;
    ensure!(tokens == expected, "{tokens:?} != {expected:?} in process");
    let (status, _, models) = support::http(&serving.http, "GET", "/v1/models", "")?;
    ensure!(status == 200, "{status}: {models}");
    let models: Value = serde_json::from_str(&models)?;
    let served = &models["data"][0]["id"];
    let (status, _, body) = support::http(
        &serving.http,
        "POST",
        "/v1/completions",
        &serde_json::json!({"model": served, "prompt": PROMPT, "max_tokens": 12, "temperature": 0})
            .to_string(),
    )?;
    ensure!(status == 200, "{status}: {body}");
    let answer: Value = serde_json::from_str(&body)?;
    if answer["usage"]["completion_tokens"] != expected.len() {
        bail!("{answer} against {} tokens in process", expected.len());
    }
    Ok(())
}
