//! The dependency rules of ARCHITECTURE.md, checked over `cargo metadata`:
//! the crate list there (its first code block) is read as the rules, and
//! the workspace's real graph must follow it. Each crate depends on
//! exactly the workspace crates its line names (`← a, b`; none without an
//! arrow; any above it for `← all of them`), only on crates above it, and
//! a crate of the `no libtorch` group links no `tch`/`torch-sys`. The
//! measurements reach the dispatch without the router's HTTP stack
//! (`cargo tree`, which resolves one crate's features alone).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One line of ARCHITECTURE.md's crate list.
#[derive(Debug)]
struct Rule {
    name: String,
    /// In the `no libtorch` group.
    no_libtorch: bool,
    /// The workspace crates it depends on; None: any above it.
    deps: Option<BTreeSet<String>>,
}

/// The crate list of ARCHITECTURE.md, bottom-up.
fn rules() -> Result<Vec<Rule>> {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md"))?;
    let block = text
        .split("```")
        .nth(1)
        .context("ARCHITECTURE.md has no code block")?;
    let mut group = String::new();
    let mut rules = Vec::new();
    for line in block.lines().filter(|l| l.contains("tramontane")) {
        let start = line.find("tramontane").context("a crate name")?;
        if !line[..start].trim().is_empty() {
            group = line[..start].trim().to_string();
        }
        let rest = &line[start..];
        let name = rest.split_whitespace().next().context("a crate name")?;
        let deps = match rest.split_once('←').map(|(_, deps)| deps.trim()) {
            Some("all of them") => None,
            Some(deps) => Some(
                deps.split(',')
                    .map(|d| format!("tramontane-{}", d.trim()))
                    .collect(),
            ),
            None => Some(BTreeSet::new()),
        };
        rules.push(Rule {
            name: name.to_string(),
            no_libtorch: group == "no libtorch",
            deps,
        });
    }
    ensure!(!rules.is_empty(), "no crate list in ARCHITECTURE.md");
    Ok(rules)
}

/// The standard output of `cargo ARGS --locked` for this host's target
/// triple (`target_flag` names the option that takes it): the graph of the
/// platform that is built.
fn cargo(args: &[&str], target_flag: &str) -> Result<Vec<u8>> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(repo())
        .args(args)
        .args(["--locked", target_flag, &host()?])
        .output()?;
    ensure!(
        out.status.success(),
        "cargo {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// This host's target triple: the graph of its platform is the one built.
fn host() -> Result<String> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output()?;
    String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")
}

/// Per package name, its normal (not dev, not build) dependencies by name.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The workspace's resolved graph, and its members.
fn graph() -> Result<(Graph, BTreeSet<String>)> {
    let out = cargo(&["metadata", "--format-version", "1"], "--filter-platform")?;
    let metadata: Value = serde_json::from_slice(&out)?;
    let names: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .context("packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?)))
        .collect();
    let name = |id: &Value| -> Result<String> {
        let id = id.as_str().context("a package id")?;
        Ok(names.get(id).context("an unknown package id")?.to_string())
    };
    let members = metadata["workspace_members"]
        .as_array()
        .context("workspace_members")?
        .iter()
        .map(name)
        .collect::<Result<_>>()?;
    let mut graph = BTreeMap::new();
    for node in metadata["resolve"]["nodes"].as_array().context("resolve")? {
        let mut deps = BTreeSet::new();
        for dep in node["deps"].as_array().context("deps")? {
            let normal = dep["dep_kinds"]
                .as_array()
                .context("dep_kinds")?
                .iter()
                .any(|kind| kind["kind"].is_null());
            if normal {
                deps.insert(name(&dep["pkg"])?);
            }
        }
        graph.insert(name(&node["id"])?, deps);
    }
    Ok((graph, members))
}

/// Every package `from` reaches through normal dependencies.
fn closure(graph: &Graph, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([from.to_string()]);
    while let Some(package) = queue.pop_front() {
        for dep in graph.get(&package).into_iter().flatten() {
            if seen.insert(dep.clone()) {
                queue.push_back(dep.clone());
            }
        }
    }
    seen
}

#[test]
fn the_workspace_graph_follows_the_rules_of_architecture_md() -> Result<()> {
    let rules = rules()?;
    let (graph, members) = graph()?;
    let listed: BTreeSet<String> = rules.iter().map(|r| r.name.clone()).collect();
    ensure!(
        listed == members,
        "ARCHITECTURE.md lists {listed:?}, the workspace has {members:?}"
    );
    let mut broken = Vec::new();
    for (position, rule) in rules.iter().enumerate() {
        let above: BTreeSet<String> = rules[..position].iter().map(|r| r.name.clone()).collect();
        let deps: BTreeSet<String> = graph[&rule.name].intersection(&members).cloned().collect();
        if let Some(listed) = rule.deps.as_ref().filter(|listed| **listed != deps) {
            broken.push(format!(
                "{} depends on {deps:?}, ARCHITECTURE.md says {listed:?}",
                rule.name
            ));
        }
        if let Some(below) = deps.difference(&above).next() {
            broken.push(format!("{} depends on {below}, listed below it", rule.name));
        }
        let reached = closure(&graph, &rule.name);
        if rule.no_libtorch {
            for torch in ["tch", "torch-sys"] {
                if reached.contains(torch) {
                    broken.push(format!("{} links libtorch ({torch})", rule.name));
                }
            }
        }
    }
    if !broken.is_empty() {
        bail!(
            "the crate graph breaks ARCHITECTURE.md:\n{}",
            broken.join("\n")
        );
    }
    // The rules can fail: the router reaches libtorch, the planner does not.
    ensure!(closure(&graph, "tramontane-router").contains("tch"));
    ensure!(
        rules
            .iter()
            .any(|r| r.name == "tramontane-planner" && r.no_libtorch)
    );
    Ok(())
}

#[test]
fn the_measurements_reach_the_dispatch_without_the_routers_http_stack() -> Result<()> {
    let out = cargo(
        &[
            "tree",
            "-p",
            "tramontane-measure",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ],
        "--target",
    )?;
    let tree = String::from_utf8(out)?;
    let packages: BTreeSet<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    ensure!(packages.contains("tramontane-dispatch"), "{packages:?}");
    for http in ["tramontane-router", "axum", "minijinja"] {
        ensure!(
            !packages.contains(http),
            "tramontane-measure reaches {http}"
        );
    }
    Ok(())
}
