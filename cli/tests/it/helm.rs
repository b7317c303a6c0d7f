//! The Helm chart `deploy/helm/tramontane`: the pytest suite in
//! `deploy/helm/tests/` renders it offline with the real Helm engine
//! (helm-python-sdk) for the default values, the CPU demo and a Mixtral 8x7B
//! plan, lints it, validates every manifest against the Kubernetes 1.30
//! schemas, checks names, ports, probes, placement and refusals, that this
//! binary takes every flag the chart passes to `worker` and `router`, and
//! runs the CPU demo's rendered command lines as processes to the
//! in-process tokens.

use std::path::Path;

use anyhow::Result;

use crate::support;

#[test]
fn helm_chart_suite_passes() -> Result<()> {
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/tests");
    support::pytest(
        &suite,
        &[("TRAMONTANE_BIN", env!("CARGO_BIN_EXE_tramontane"))],
    )
}
