//! The values of the Helm chart `deploy/helm/tramontane/` for a plan
//! (`plan --helm-values`): only what the plan decides — workers, their
//! devices and memory, the placement, the scheduler limits it simulated —
//! nested as in the chart's `values.yaml`, which is the contract. Helm takes
//! JSON values files (`helm install -f FILE`) and merges them over its
//! defaults.

use serde::Serialize;
use tramontane_config::Dtype;
use tramontane_policy::placement::Placement;

use crate::memory::DeviceMemory;
use crate::plan::{ClusterPlan, Planner};

const GIB: u64 = 1 << 30;

/// Host memory a pod requests beyond the plan's figure for its process: the
/// runtime (libtorch, the CUDA context's host side), a step's activations and
/// the gRPC buffers, which the planner does not account.
pub const HEADROOM_BYTES: u64 = 4 * GIB;

#[derive(Debug, thiserror::Error)]
pub enum HelmValuesError {
    #[error("the chart computes in f32 or bf16, the plan in {0}: plan with --dtype f32 or bf16")]
    Dtype(Dtype),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HelmValues<'a> {
    pub model: ModelValues,
    /// Exactly what `--placement-out` writes, so the chart's placement
    /// ConfigMap is the plan's placement.
    pub placement: &'a Placement,
    pub workers: WorkerValues,
    pub router: RouterValues,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelValues {
    /// `f32` or `bf16`: the dtype planned.
    pub dtype: &'static str,
    /// Decoder layers, dense or not: the placement's rows.
    pub num_layers: usize,
    /// Routed experts of an MoE layer.
    pub num_experts: usize,
    /// The layers without routed experts (their placement rows are empty).
    pub dense_layers: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerValues {
    pub replicas: usize,
    /// `cuda:0` (one GPU per pod) or `cpu`.
    pub device: &'static str,
    pub resources: Resources,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouterValues {
    pub device: &'static str,
    pub scheduler: SchedulerValues,
    pub resources: Resources,
}

/// The router's scheduler limits (its `--queue`, `--max-running`,
/// `--max-batch-tokens`, `--max-kv-tokens`) the plan simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SchedulerValues {
    pub queue: usize,
    pub max_running: usize,
    pub max_batch_tokens: usize,
    pub max_kv_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub limits: Limits,
    pub requests: Requests,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// 1 on a GPU profile; `null` on a CPU one, not absent: values.yaml asks
    /// for a GPU by default, and a `null` in a values file deletes a default.
    #[serde(rename = "nvidia.com/gpu")]
    pub gpu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Requests {
    /// A Kubernetes quantity in whole GiB, e.g. `25Gi`.
    pub memory: String,
}

/// `bytes` plus [`HEADROOM_BYTES`], rounded up to whole GiB, as a quantity.
pub fn memory_request(bytes: u64) -> String {
    format!("{}Gi", (bytes + HEADROOM_BYTES).div_ceil(GIB))
}

impl<'a> HelmValues<'a> {
    /// The values for `plan`, one of `planner`'s plans, computed in `dtype`.
    ///
    /// Memory requests are host memory, from the plan's accounting of each
    /// process ([`DeviceMemory::total_bytes`]) plus [`HEADROOM_BYTES`]: a
    /// worker's experts, the router's dense weights and KV cache. On a CPU
    /// profile that is the process's memory itself; on a GPU profile the
    /// planner accounts device memory only, and the figure stands for host
    /// memory because the weights are loaded through it (a generous bound:
    /// the router's KV cache lives on the GPU). The workers are one
    /// StatefulSet, so they all request the largest worker's figure.
    pub fn new(
        planner: &Planner,
        plan: &'a ClusterPlan,
        dtype: Dtype,
    ) -> Result<Self, HelmValuesError> {
        if !matches!(dtype, Dtype::F32 | Dtype::Bf16) {
            return Err(HelmValuesError::Dtype(dtype));
        }
        // Workers sharing one host are a CPU profile (`tramontane profile
        // --device cpu`); the built-in profiles and measurements on
        // `cuda:N` give every worker a GPU of its own.
        let gpu = planner.profile.shared_lanes.is_none();
        let device = if gpu { "cuda:0" } else { "cpu" };
        let resources = |bytes: u64| Resources {
            limits: Limits {
                gpu: gpu.then_some(1),
            },
            requests: Requests {
                memory: memory_request(bytes),
            },
        };
        let total = |m: &DeviceMemory| m.total_bytes;
        // `memory` holds the router, then each worker.
        let (router, workers) = plan.memory.split_first().map_or((0, 0), |(r, w)| {
            (total(r), w.iter().map(total).max().unwrap_or(0))
        });
        let s = &planner.scheduler;
        Ok(Self {
            model: ModelValues {
                dtype: dtype.flag(),
                num_layers: planner.model.spec.layers.len(),
                num_experts: planner.model.spec.max_experts(),
                dense_layers: (0..planner.model.spec.layers.len())
                    .filter(|&l| planner.model.spec.moe(l).is_none())
                    .collect(),
            },
            placement: &plan.placement,
            workers: WorkerValues {
                replicas: plan.workers,
                device,
                resources: resources(workers),
            },
            router: RouterValues {
                device,
                scheduler: SchedulerValues {
                    queue: s.max_waiting,
                    max_running: s.max_running,
                    max_batch_tokens: s.max_batch_tokens,
                    max_kv_tokens: s.max_kv_tokens,
                },
                resources: resources(router),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tramontane_policy::scheduler::SchedulerConfig;

    use super::*;
    use crate::plan::{PlacementPolicy, Slo};
    use crate::routing::TokenRouting;
    use crate::test_fixtures;
    use crate::workload::{Arrivals, Lengths, Workload};

    fn planner(shared_lanes: Option<usize>) -> Planner {
        let model = test_fixtures::shape(2, 4, 2);
        let mut profile = test_fixtures::profile(&model, 0.0, 1e-3, 1e-4);
        profile.shared_lanes = shared_lanes;
        Planner {
            routing: TokenRouting::uniform(&model),
            model,
            profile,
            workload: Workload {
                arrivals: Arrivals::Concurrency(2),
                prompt: Lengths::Fixed(8),
                output: Lengths::Fixed(4),
                requests: 4,
                seed: 0,
                prefix_share: 0.0,
            },
            scheduler: SchedulerConfig {
                max_batch_tokens: 128,
                max_running: 8,
                max_kv_tokens: 4096,
                max_waiting: 16,
                prefix_caching: true,
            },
            wire_bytes: 4,
            policy: PlacementPolicy::Eplb,
            spare_slots: 1,
            slo: Slo::default(),
        }
    }

    #[test]
    fn memory_requests_add_the_headroom_and_round_up_to_whole_gib() {
        assert_eq!(memory_request(0), "4Gi");
        assert_eq!(memory_request(1), "5Gi");
        assert_eq!(memory_request(21 * GIB), "25Gi");
        assert_eq!(memory_request(21 * GIB + 1), "26Gi");
    }

    #[test]
    fn a_gpu_plan_asks_for_a_gpu_per_pod_and_carries_the_plan() {
        let planner = planner(None);
        let plan = planner.plan(2).unwrap();
        let values =
            serde_json::to_value(HelmValues::new(&planner, &plan, Dtype::F32).unwrap()).unwrap();
        assert_eq!(
            values["model"],
            json!({"dtype": "f32", "numLayers": 2, "numExperts": 4, "denseLayers": []})
        );
        assert_eq!(values["workers"]["replicas"], 2);
        assert_eq!(values["workers"]["device"], "cuda:0");
        for pod in ["workers", "router"] {
            assert_eq!(
                values[pod]["resources"],
                json!({"limits": {"nvidia.com/gpu": 1}, "requests": {"memory": "5Gi"}}),
                "{pod}"
            );
        }
        assert_eq!(
            values["router"]["scheduler"],
            json!({"queue": 16, "maxRunning": 8, "maxBatchTokens": 128, "maxKvTokens": 4096})
        );
        assert_eq!(
            values["placement"],
            serde_json::to_value(&plan.placement).unwrap()
        );
    }

    #[test]
    fn a_cpu_plan_deletes_the_charts_default_gpu_limit() {
        let planner = planner(Some(4));
        let plan = planner.plan(2).unwrap();
        let values =
            serde_json::to_value(HelmValues::new(&planner, &plan, Dtype::Bf16).unwrap()).unwrap();
        for pod in ["workers", "router"] {
            assert_eq!(values[pod]["device"], "cpu", "{pod}");
            assert_eq!(
                values[pod]["resources"]["limits"],
                json!({"nvidia.com/gpu": null}),
                "{pod}"
            );
        }
    }

    #[test]
    fn the_workers_request_the_largest_workers_memory() {
        let planner = planner(None);
        let mut plan = planner.plan(2).unwrap();
        plan.memory[2] = DeviceMemory::new("worker 1".into(), 1, 30 * GIB, 0, 0, 1 << 40);
        let values = HelmValues::new(&planner, &plan, Dtype::Bf16).unwrap();
        assert_eq!(values.workers.resources.requests.memory, "34Gi");
        assert_eq!(values.model.dtype, "bf16");
    }

    #[test]
    fn a_dtype_the_chart_does_not_run_is_refused() {
        let planner = planner(None);
        let plan = planner.plan(2).unwrap();
        let err = HelmValues::new(&planner, &plan, Dtype::F16).unwrap_err();
        assert!(err.to_string().contains("plan in f16"), "{err}");
    }

    #[test]
    fn a_model_with_dense_layers_has_their_empty_rows_in_its_placement() {
        let model = test_fixtures::with_dense_layers(3, 4, 2, &[0], 24);
        let planner = Planner {
            routing: TokenRouting::uniform(&model),
            profile: test_fixtures::profile(&model, 0.0, 1e-3, 1e-4),
            model,
            ..planner(None)
        };
        let plan = planner.plan(2).unwrap();
        let values =
            serde_json::to_value(HelmValues::new(&planner, &plan, Dtype::Bf16).unwrap()).unwrap();
        assert_eq!(
            values["model"],
            json!({"dtype": "bf16", "numLayers": 3, "numExperts": 4, "denseLayers": [0]})
        );
        let rows: Vec<usize> = values["placement"]["experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().len())
            .collect();
        assert_eq!(rows, [0, 4, 4]);
    }
}
