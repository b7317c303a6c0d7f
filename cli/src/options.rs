//! Flag groups several subcommands share: where the model computes, the
//! router's tuning and the scheduler's limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use tch::Device;
use tramontane_dispatch::MicroBatches;
use tramontane_infra::grpc::DEFAULT_MAX_MESSAGE_BYTES;
use tramontane_infra::tls::Tls;
use tramontane_model::{Dtype, LoadOptions, Quantization, SharedExperts};
use tramontane_policy::scheduler::{SchedulerConfig, SchedulerConfigError};
use tramontane_router::RouterOptions;
use tramontane_router::api_keys::ApiKeys;

/// Where and how the model computes.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// dtype the weights are loaded into and computed in.
    #[arg(long, value_enum, default_value = "f32", env = "TRAMONTANE_DTYPE")]
    pub dtype: Dtype,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu", env = "TRAMONTANE_DEVICE")]
    pub device: String,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long, env = "TRAMONTANE_THREADS")]
    pub threads: Option<i32>,
    /// Where a model's shared experts run (Qwen2-MoE): on the router beside
    /// the dense part, or on the workers as one more expert of each layer
    /// (id: the layer's routed experts), placed like the others.
    #[arg(
        long,
        value_enum,
        default_value = "router",
        env = "TRAMONTANE_SHARED_EXPERTS"
    )]
    pub shared_experts: SharedExperts,
    /// Hold the routed experts quantized, weight-only (activations stay in
    /// --dtype): int8, one f32 scale per output row, from a bf16, f16 or
    /// f32 checkpoint.
    #[arg(long, value_enum, env = "TRAMONTANE_QUANTIZE")]
    pub quantize: Option<Quantization>,
    /// With --quantize: the dense part's projections too (attention, dense
    /// and shared MLPs, lm_head; not the embeddings, gates or norms).
    #[arg(long, requires = "quantize", env = "TRAMONTANE_QUANTIZE_DENSE")]
    pub quantize_dense: bool,
}

impl ComputeArgs {
    /// What a worker started for this process computes like: its dtype,
    /// where shared experts run, its experts' quantization.
    pub fn worker_args(&self) -> Vec<String> {
        let mut args = vec![
            "--dtype".to_string(),
            self.dtype.flag().into(),
            "--shared-experts".into(),
            self.shared_experts.flag().into(),
        ];
        if let Some(quantize) = self.quantize {
            args.extend(["--quantize".to_string(), quantize.flag().into()]);
        }
        args
    }

    /// Validates the options and applies the thread count.
    pub fn load_options(&self) -> Result<LoadOptions> {
        let device = parse_device(&self.device)?;
        if let Some(threads) = self.threads {
            if threads < 1 {
                bail!("--threads must be at least 1, got {threads}");
            }
            tch::set_num_threads(threads);
        }
        Ok(LoadOptions {
            dtype: self.dtype,
            device,
            shared_experts: self.shared_experts,
            quantize: self.quantize,
            quantize_dense: self.quantize_dense,
        })
    }
}

pub fn parse_device(text: &str) -> Result<Device> {
    if text == "cpu" {
        return Ok(Device::Cpu);
    }
    let Some(index) = text.strip_prefix("cuda:") else {
        bail!("device must be cpu or cuda:N, got {text:?}");
    };
    let Ok(index) = index.parse::<usize>() else {
        bail!("device must be cpu or cuda:N, got {text:?}");
    };
    if !tramontane_model::cuda::load() {
        bail!("device {text}: this libtorch has no CUDA (libtorch_cuda.so not found)");
    }
    let available = tch::Cuda::device_count() as usize;
    if index >= available {
        bail!("device {text} is not available ({available} CUDA devices)");
    }
    Ok(Device::Cuda(index))
}

/// Options of the router that `serve` shares.
#[derive(Debug, Args)]
pub struct RouterTuning {
    /// A placement file (JSON, see the README); default: expert e on worker e mod W.
    #[arg(long, env = "TRAMONTANE_PLACEMENT")]
    pub placement: Option<PathBuf>,
    /// Deadline of one layer's Forward to one worker, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub dispatch_timeout_ms: u64,
    /// How long to wait at start for every worker to answer, in seconds.
    #[arg(long, default_value_t = 120)]
    pub startup_timeout_s: u64,
    /// On SIGTERM / Ctrl-C, how long the requests in flight may take to
    /// finish (new ones are refused meanwhile), in seconds.
    #[arg(long, alias = "drain-timeout-s", default_value_t = 30)]
    pub drain_timeout: u64,
    /// Rebalance the experts over their recent load every this many
    /// seconds (EPLB within --spare-slots, only where it pays); off by
    /// default. `POST /admin/rebalance` rebalances on demand.
    #[arg(long, value_name = "SECONDS")]
    pub rebalance_interval: Option<u64>,
    /// Expert slots per worker and layer, beyond its even share, that a
    /// rebalance may fill with copies of hot experts (each costs a worker
    /// one expert's memory).
    #[arg(long, default_value_t = 0)]
    pub spare_slots: usize,
    /// When a worker is lost, copy the experts no other worker holds onto
    /// the others with room (within --spare-slots) and serve on; it rejoins
    /// when it comes back.
    #[arg(long)]
    pub self_heal: bool,
    /// Micro-batches per step: `auto` (2 for steps of 256 tokens or more,
    /// else 1) or a count. Their layers interleave: one's attention runs
    /// while another's experts are out on the workers.
    #[arg(long, default_value = "auto")]
    pub micro_batches: MicroBatches,
    /// dtype of hidden states on the wire (default: the compute dtype,
    /// --dtype).
    #[arg(long, value_enum)]
    pub wire_dtype: Option<Dtype>,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// Record the experts every token chose, per step and layer, into this
    /// file (JSON lines; the planner's routing trace).
    #[arg(long)]
    pub record_routing: Option<PathBuf>,
    /// Once the routing trace holds this many bytes it is renamed to
    /// FILE.1 (replacing the one before) and a new FILE starts.
    #[arg(long, default_value_t = 1 << 30)]
    pub record_routing_max_bytes: u64,
    /// The model name clients send (default: the model folder's name).
    #[arg(long, env = "TRAMONTANE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Largest gRPC message to a worker, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    #[command(flatten)]
    pub access: AccessArgs,
    #[command(flatten)]
    pub connections: crate::connections::RouterConnectionArgs,
}

/// TLS files of a worker or router (PEM). A worker serves over TLS with its
/// certificate and, with a CA, takes only clients that present a
/// certificate that CA signed (mTLS). A router connects to its workers over
/// TLS when given the CA that signed theirs, presents its certificate to
/// them, and serves its public listeners (HTTPS, gRPC) with it.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// This process's certificate (chain), PEM.
    #[arg(long, env = "TRAMONTANE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, env = "TRAMONTANE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed the other side's certificates, PEM.
    #[arg(long, env = "TRAMONTANE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files read and checked; None without any.
    pub fn load(&self) -> Result<Option<Tls>> {
        Ok(Tls::from_files(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
        )?)
    }
}

/// Who may call the public APIs, and where the observability routes are.
#[derive(Debug, Args)]
pub struct AccessArgs {
    /// An API key clients must send (`Authorization: Bearer KEY`, gRPC
    /// `authorization` metadata); repeat for several. Without any key the
    /// APIs are open.
    #[arg(long = "api-key", env = "TRAMONTANE_API_KEY", hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` starts a comment line).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Serve /metrics, /v1/experts/stats and /health on this address of
    /// their own, without a key (default: on the HTTP API's address, behind
    /// the key).
    #[arg(long, env = "TRAMONTANE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the admin API (`/admin/placement`) on this address, behind
    /// --admin-key (off by default).
    #[arg(long, env = "TRAMONTANE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// The key the admin API needs (`Authorization: Bearer KEY`); required
    /// with --admin-listen, and not one of the API keys.
    #[arg(long, env = "TRAMONTANE_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
}

impl AccessArgs {
    /// The admin API's key, with --admin-listen: required, and not an API
    /// key (those must not open it).
    pub fn admin_key(&self) -> Result<Option<ApiKeys>> {
        let Some(_) = self.admin_listen else {
            return Ok(None);
        };
        let Some(key) = &self.admin_key else {
            bail!("--admin-listen needs --admin-key (or TRAMONTANE_ADMIN_KEY)");
        };
        if self.api_keys.contains(key) {
            bail!("--admin-key must not be one of the API keys: they must not open the admin API");
        }
        let key = ApiKeys::new([key]).map_err(|e| anyhow::anyhow!("--admin-key: {e}"))?;
        Ok(Some(key))
    }

    pub fn api_keys(&self) -> Result<ApiKeys> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_key_file {
            let from_file = ApiKeys::read_file(path)?;
            if from_file.is_empty() {
                bail!("--api-key-file {}: no key in it", path.display());
            }
            keys.extend(from_file);
        }
        ApiKeys::new(keys).map_err(|e| anyhow::anyhow!("--api-key: {e}"))
    }
}

impl RouterTuning {
    pub fn options(
        &self,
        model: PathBuf,
        workers: Vec<String>,
        compute: &ComputeArgs,
        tls: Option<Tls>,
    ) -> Result<RouterOptions> {
        if workers.is_empty() {
            bail!("--workers: at least one worker address is needed");
        }
        if self.dispatch_timeout_ms == 0 {
            bail!("--dispatch-timeout-ms must be at least 1");
        }
        if self.rebalance_interval == Some(0) {
            bail!("--rebalance-interval must be at least 1 second");
        }
        Ok(RouterOptions {
            model_dir: model,
            workers,
            placement: self.placement.clone(),
            load: compute.load_options()?,
            dispatch_timeout: Duration::from_millis(self.dispatch_timeout_ms),
            startup_timeout: Duration::from_secs(self.startup_timeout_s),
            wire: self.wire_dtype.unwrap_or(compute.dtype),
            micro_batches: self.micro_batches,
            scheduler: self.scheduler.config()?,
            max_message_bytes: self.max_message_bytes,
            served_model_name: self.served_model_name.clone(),
            record_routing: self.record_routing.clone(),
            record_routing_max_bytes: self.record_routing_max_bytes,
            api_keys: self.access.api_keys()?,
            drain_timeout: Duration::from_secs(self.drain_timeout),
            rebalance_interval: self.rebalance_interval.map(Duration::from_secs),
            spare_slots: self.spare_slots,
            self_heal: self.self_heal,
            tls,
        })
    }
}

/// The scheduler's limits (the planner simulates the same).
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Requests that may wait for admission; beyond it requests are refused
    /// (HTTP 429, gRPC RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Tokens in one forward step: decode tokens first, then prompt chunks.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// KV cache tokens the running sequences may reserve (prompt + max_tokens each).
    #[arg(long, default_value_t = 65_536)]
    pub max_kv_tokens: usize,
    /// Prefill every prompt from scratch: no KV blocks shared between
    /// sequences with a common prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
}

impl SchedulerArgs {
    pub fn config(&self) -> Result<SchedulerConfig> {
        let config = SchedulerConfig {
            max_batch_tokens: self.max_batch_tokens,
            max_running: self.max_running,
            max_kv_tokens: self.max_kv_tokens,
            max_waiting: self.queue,
            prefix_caching: !self.no_prefix_caching,
        };
        config
            .validate()
            .map_err(|e| anyhow::anyhow!(flag_error(&e)))?;
        Ok(config)
    }
}

/// The flag each scheduler limit comes from.
fn flag(field: &str) -> &'static str {
    match field {
        "max_batch_tokens" => "--max-batch-tokens",
        "max_running" => "--max-running",
        "max_kv_tokens" => "--max-kv-tokens",
        "max_waiting" => "--queue",
        _ => "a scheduler limit",
    }
}

/// A scheduler limit's error, in the flags' names.
fn flag_error(error: &SchedulerConfigError) -> String {
    match *error {
        SchedulerConfigError::Zero(field) => format!("{} must be at least 1", flag(field)),
        SchedulerConfigError::BudgetBelowRunning { budget, running } => format!(
            "--max-batch-tokens ({budget}) must be at least --max-running ({running}): every running sequence decodes each step"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_or_fail_clearly() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
            let err = parse_device(bad).unwrap_err().to_string();
            assert!(err.contains("cpu or cuda:N"), "{bad}: {err}");
        }
        if !tch::Cuda::is_available() {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("not available"), "{err}");
        }
    }

    #[test]
    fn scheduler_errors_name_the_flags_that_exist() {
        let args = |queue, max_running, max_batch_tokens| SchedulerArgs {
            queue,
            max_batch_tokens,
            max_running,
            max_kv_tokens: 100,
            no_prefix_caching: false,
        };
        let err = args(0, 4, 8).config().unwrap_err().to_string();
        assert_eq!(err, "--queue must be at least 1");
        let err = args(1, 0, 8).config().unwrap_err().to_string();
        assert_eq!(err, "--max-running must be at least 1");
        let err = args(1, 16, 8).config().unwrap_err().to_string();
        assert!(
            err.starts_with("--max-batch-tokens (8) must be at least --max-running (16)"),
            "{err}"
        );
    }

    #[test]
    fn prefix_caching_is_on_unless_turned_off() {
        use clap::Parser;
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            scheduler: SchedulerArgs,
        }
        let config = |args: &[&str]| {
            let flags = Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied()));
            flags.unwrap().scheduler.config().unwrap()
        };
        assert!(config(&[]).prefix_caching);
        assert!(!config(&["--no-prefix-caching"]).prefix_caching);
    }
}
