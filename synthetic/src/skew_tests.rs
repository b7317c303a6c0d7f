//! `--expert-skew X`: 0 changes nothing; X = 1 makes the routers prefer
//! experts in the popularity order 0, 4, 2, 6, 1, 5, 3, 7 in every layer,
//! while every expert still gets tokens; in every family, every routed layer
//! (dense layers, a shared expert and attention biases beside). Loads are
//! counted in process, on the real gates, over pseudo-random prompts.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use anyhow::{Context, Result, ensure};
use tch::Tensor;
use tramontane_config::{Family, ModelSpec};
use tramontane_model::gating::Routing;
use tramontane_model::testing::{TestExperts, dense_over};
use tramontane_model::{ForwardError, Logits};

use crate::{Preset, Spec, write};

/// The tiny preset with `seed` and `skew`.
fn spec(seed: u64, skew: f64) -> Spec {
    Spec {
        seed,
        expert_skew: skew,
        ..Spec::default()
    }
}

/// Hottest first, as gen-model documents it for 8 experts.
const POPULARITY: [usize; 8] = [0, 4, 2, 6, 1, 5, 3, 7];

/// What the gates did, per layer.
#[derive(Default)]
struct LayerStats {
    /// Token rows routed to each expert.
    routed: Vec<u64>,
    /// Sum over tokens of the residual stream's RMS without the bias feature
    /// (read back from the feature at the gate's input), and their count.
    residual_rms: (f64, u64),
}

/// Adds what a layer's gate did with `xs` to its statistics.
fn count(stats: &mut LayerStats, xs: &Tensor, routing: &Routing) -> Result<(), tch::TchError> {
    for &id in &routing.experts {
        stats.routed[id] += 1;
    }
    // Under --expert-skew the last coordinate is 1 / rms(x) here (its norm
    // scale is 1); rms without it follows from rms(x).
    let h = xs.size()[1] as f64;
    let feature: Vec<f64> = Vec::try_from(xs.select(1, -1).to_kind(tch::Kind::Double))?;
    for f in feature {
        let rms = 1.0 / f;
        stats.residual_rms.0 += ((h * rms * rms - 1.0) / (h - 1.0)).max(0.0).sqrt();
        stats.residual_rms.1 += 1;
    }
    Ok(())
}

/// Runs `prompts` pseudo-random prompts of `len` tokens through the model in
/// `dir` (one prefill) and returns the gates' statistics per layer.
fn gate_stats(dir: &Path, prompts: usize, len: usize) -> Result<Vec<LayerStats>> {
    let _guard = tch::no_grad_guard();
    let config = ModelSpec::from_file(&dir.join("config.json"))?;
    let stats: Rc<RefCell<Vec<LayerStats>>> = Rc::new(RefCell::new(
        config
            .experts_per_layer()
            .into_iter()
            .map(|experts| LayerStats {
                routed: vec![0; experts],
                ..LayerStats::default()
            })
            .collect(),
    ));
    // The in-process experts, counting what each gate sends them.
    let counted = stats.clone();
    let model = dense_over(dir, tch::Kind::Float, |local| {
        TestExperts::new(local).hook(move |layer, xs, routing| {
            count(&mut counted.borrow_mut()[layer], xs, routing).map_err(ForwardError::from)
        })
    })?;
    // xorshift: the same prompts every run, no special tokens.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let vocab = config.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..prompts)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (3 + state % (vocab - 3)) as u32
                })
                .collect()
        })
        .collect();
    let kv = model.kv_pool_for(prompts.len(), len);
    let _ = model.prefill(&kv, &prompts, Logits::LastPosition)?;
    drop(kv);
    drop(model);
    Rc::try_unwrap(stats)
        .ok()
        .context("the model still holds the statistics")
        .map(RefCell::into_inner)
}

/// Each expert's load as a multiple of the mean load.
fn relative_loads(routed: &[u64]) -> Vec<f64> {
    let mean = routed.iter().sum::<u64>() as f64 / routed.len() as f64;
    routed.iter().map(|&n| n as f64 / mean).collect()
}

fn tensors(dir: &Path) -> Result<Vec<u8>> {
    Ok(std::fs::read(dir.join("model.safetensors"))?)
}

#[test]
fn zero_skew_writes_the_same_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let plain = dir.path().join("plain");
    let zero = dir.path().join("zero");
    let skewed = dir.path().join("skewed");
    write(
        &plain,
        &Spec {
            seed: 5,
            ..Spec::default()
        },
    )?;
    write(&zero, &spec(5, 0.0))?;
    write(&skewed, &spec(5, 1.0))?;
    ensure!(
        tensors(&plain)? == tensors(&zero)?,
        "--expert-skew 0 changed the weights"
    );
    ensure!(
        tensors(&plain)? != tensors(&skewed)?,
        "--expert-skew 1 left the weights as they were"
    );
    // Still a plain HF config, the same as without the flag.
    ensure!(
        std::fs::read(plain.join("config.json"))? == std::fs::read(skewed.join("config.json"))?,
        "--expert-skew changed config.json"
    );
    Ok(())
}

#[test]
fn skewed_gates_prefer_the_documented_experts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write(&model, &spec(0, 1.0))?;
    let stats = gate_stats(&model, 16, 64)?;
    ensure!(stats.len() == 2, "tiny has 2 layers");
    for (layer, stats) in stats.iter().enumerate() {
        let loads = relative_loads(&stats.routed);
        eprintln!(
            "layer {layer}: routed {:?}, × mean {loads:.2?}",
            stats.routed
        );
        let hottest = (0..loads.len())
            .max_by(|&a, &b| loads[a].total_cmp(&loads[b]))
            .context("experts")?;
        ensure!(
            hottest == POPULARITY[0],
            "layer {layer}: the hottest expert is {hottest}, not 0: {loads:.2?}"
        );
        ensure!(
            loads[hottest] >= 2.5,
            "layer {layer}: the hottest expert gets only {:.2}× the mean load",
            loads[hottest]
        );
        let mut coldest_first: Vec<usize> = (0..loads.len()).collect();
        coldest_first.sort_by(|&a, &b| loads[a].total_cmp(&loads[b]));
        ensure!(
            coldest_first[..3].contains(&POPULARITY[7]),
            "layer {layer}: expert 7 is not among the 3 coldest: {loads:.2?}"
        );
        ensure!(
            stats.routed.iter().all(|&n| n > 0),
            "layer {layer}: some expert gets no token: {:?}",
            stats.routed
        );
    }
    Ok(())
}

#[test]
fn every_family_skews_every_routed_layer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A dense layer between routed ones; a shared expert and q/k/v biases;
    // o biases (which must leave the bias feature alone).
    let specs = [
        Spec {
            layers: Some(3),
            dense_layers: Some(vec![1]),
            ..Spec::family(Family::Qwen3Moe, Preset::Tiny)
        },
        Spec::family(Family::Qwen2Moe, Preset::Tiny),
        Spec {
            attention_bias: Some(true),
            ..Spec::family(Family::Olmoe, Preset::Tiny)
        },
    ];
    for spec in specs {
        let family = spec.family.model_type();
        let model = dir.path().join(family);
        write(
            &model,
            &Spec {
                expert_skew: 1.0,
                ..spec.clone()
            },
        )?;
        let (_, described) = spec.config()?;
        let stats = gate_stats(&model, 16, 64)?;
        for (layer, stats) in stats.iter().enumerate() {
            if described.moe(layer).is_none() {
                ensure!(stats.residual_rms.1 == 0, "{family} layer {layer} is dense");
                continue;
            }
            let loads = relative_loads(&stats.routed);
            eprintln!("{family} layer {layer}: × mean {loads:.2?}");
            let hottest = (0..loads.len())
                .max_by(|&a, &b| loads[a].total_cmp(&loads[b]))
                .context("experts")?;
            // 16 experts top-4: at most 4× the mean.
            ensure!(
                hottest == 0 && loads[0] >= 2.0,
                "{family} layer {layer}: expert 0 is not hot: {loads:.2?}"
            );
            let coldest = (0..loads.len())
                .min_by(|&a, &b| loads[a].total_cmp(&loads[b]))
                .context("experts")?;
            ensure!(
                loads[coldest] < 0.5,
                "{family} layer {layer}: no expert is cold: {loads:.2?}"
            );
        }
    }
    Ok(())
}

#[test]
fn negative_or_non_finite_skew_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for value in [-0.5, f64::NAN, f64::INFINITY] {
        let err = write(&dir.path().join("model"), &spec(0, value))
            .err()
            .with_context(|| format!("--expert-skew {value} was accepted"))?;
        ensure!(
            err.to_string().contains("--expert-skew"),
            "the error for --expert-skew {value} does not name the flag: {err}"
        );
    }
    ensure!(
        !dir.path().join("model/model.safetensors").exists(),
        "weights were written despite the error"
    );
    Ok(())
}

/// Measures the loads for the table in the crate docs (slow on `bench`):
/// `SKEW_PRESET=bench SKEW_VALUES=0,0.5,1,2 cargo test --release -p
/// tramontane-synthetic measure_loads -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_loads() -> Result<()> {
    let name = std::env::var("SKEW_PRESET").unwrap_or_else(|_| "tiny".into());
    let preset = match name.as_str() {
        "tiny" => Preset::Tiny,
        "bench" => Preset::Bench,
        other => anyhow::bail!("SKEW_PRESET: tiny or bench, not {other:?}"),
    };
    let values = std::env::var("SKEW_VALUES").unwrap_or_else(|_| "0,0.5,1,2".into());
    let dir = tempfile::tempdir()?;
    for value in values.split(',') {
        let model = dir.path().join(format!("model-{value}"));
        let skew: f64 = value
            .parse()
            .with_context(|| format!("SKEW_VALUES: {value:?}"))?;
        write(
            &model,
            &Spec {
                expert_skew: skew,
                ..Spec::preset(preset)
            },
        )?;
        let stats = gate_stats(&model, 16, 64)?;
        std::fs::remove_dir_all(&model)?;
        println!("{name} --expert-skew {value}");
        for (layer, stats) in stats.iter().enumerate() {
            let loads = relative_loads(&stats.routed);
            let in_order: Vec<String> = POPULARITY
                .iter()
                .filter(|&&e| e < loads.len())
                .map(|&e| format!("{e}:{:.2}", loads[e]))
                .collect();
            println!(
                "  layer {layer}: × mean, hottest first {} | residual rms {:.3}",
                in_order.join(" "),
                stats.residual_rms.0 / stats.residual_rms.1.max(1) as f64
            );
        }
    }
    Ok(())
}
