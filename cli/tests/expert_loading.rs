//! A process loads only the experts it holds: the key filter reads exactly
//! those tensors, and asking for an expert it does not hold is an error.

mod common;

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use tramontane_model::MixtralConfig;
use tramontane_model::error::ForwardError;
use tramontane_model::expert::expert_prefix;
use tramontane_model::gating::Routing;
use tramontane_model::moe::{Experts, LocalExperts};
use tramontane_model::weights::Checkpoint;

#[test]
fn only_selected_experts_are_loaded_and_unheld_ones_are_an_error() -> Result<()> {
    let _guard = tch::no_grad_guard();
    let dir = tempfile::tempdir()?;
    common::gen_model(dir.path(), &["--preset", "tiny", "--shards", "2"])?;
    let config = MixtralConfig::from_file(&dir.path().join("config.json"))?;
    let checkpoint = Checkpoint::open(dir.path())?;

    // Experts 1 and 5 of layer 1 only, as a worker would.
    let held = |layer: usize, expert: usize| layer == 1 && (expert == 1 || expert == 5);
    let experts = LocalExperts::load(&checkpoint, &config, &held, Kind::Float, Device::Cpu)?;
    assert_eq!(experts.held_count(), 2);
    let prefixes = [expert_prefix(1, 1), expert_prefix(1, 5)];
    let expected =
        checkpoint.stored_bytes(|key| prefixes.iter().any(|p| key.starts_with(&format!("{p}."))));
    assert_eq!(checkpoint.loaded_bytes(), expected);
    let total = checkpoint.stored_bytes(|_| true);
    assert!(
        expected * 10 < total,
        "two experts are a small part of the model"
    );

    let xs = Tensor::randn([3, config.hidden_size as i64], (Kind::Float, Device::Cpu));
    let weights = Tensor::from_slice(&[0.75f32, 0.25, 0.5, 0.5, 0.6, 0.4]).view([3, 2]);
    let held_routing = Routing {
        experts: Tensor::from_slice(&[1i64, 5, 5, 1, 1, 5]).view([3, 2]),
        weights: weights.shallow_clone(),
    };
    let out = experts.forward(1, &xs, &held_routing)?;
    assert_eq!(out.size(), xs.size());

    let unheld = Routing {
        experts: Tensor::from_slice(&[1i64, 2, 5, 1, 1, 5]).view([3, 2]),
        weights,
    };
    let err = experts.forward(1, &xs, &unheld).unwrap_err();
    assert!(
        matches!(
            err,
            ForwardError::ExpertNotHeld {
                layer: 1,
                expert: 2
            }
        ),
        "{err}"
    );
    Ok(())
}
