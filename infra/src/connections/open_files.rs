//! The file descriptors a process may open: raised at start from the soft
//! limit to the hard one (a service's connections are file descriptors;
//! 1024, a common default, is a few hundred clients), and the budget the
//! listeners' connection limits must fit in.

/// Descriptors kept for everything but client connections: the checkpoint,
/// links to workers, logs, the Prometheus and OTLP exporters.
pub const RESERVED: u64 = 128;

/// The open-file limits: soft (in force) and hard (the ceiling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    pub soft: u64,
    pub hard: u64,
}

impl OpenFiles {
    /// Raises the soft limit to the hard one and logs both; the limits in
    /// force. Where limits cannot be read (not Unix), None.
    pub fn raise() -> Option<Self> {
        let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
        let raised = rlimit::increase_nofile_limit(hard).unwrap_or(soft);
        let limits = Self { soft: raised, hard };
        if raised > soft {
            tracing::info!(
                "open files: soft limit raised from {soft} to {raised} (hard limit {hard})"
            );
        } else {
            tracing::info!("open files: soft limit {soft}, hard limit {hard}");
        }
        Some(limits)
    }

    /// Fits connection limits (`(flag, limit)` per listener) into the
    /// soft limit with [`RESERVED`] to spare: when they do not fit, each is
    /// scaled down in proportion (at least 1) and a warning names them and
    /// the limits in force, since a flood would otherwise run the process
    /// out of descriptors before the limits refuse it.
    pub fn fit(&self, limits: &mut [(&str, usize)]) {
        let budget = self.soft.saturating_sub(RESERVED);
        let wanted: u64 = limits.iter().map(|&(_, limit)| limit as u64).sum();
        if wanted <= budget {
            return;
        }
        let asked: Vec<String> = limits
            .iter()
            .map(|(flag, limit)| format!("{flag} {limit}"))
            .collect();
        for (_, limit) in limits.iter_mut() {
            *limit = ((*limit as u64 * budget / wanted) as usize).max(1);
        }
        let in_force: Vec<String> = limits
            .iter()
            .map(|(flag, limit)| format!("{flag} {limit}"))
            .collect();
        tracing::warn!(
            "connection limits ({}) do not fit the open-file limit {} less {RESERVED} kept for other files: using {}; raise the limit (ulimit -n, LimitNOFILE=) or lower them",
            asked.join(", "),
            self.soft,
            in_force.join(", "),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_do_not_fit_are_scaled_into_the_soft_limit() {
        let files = OpenFiles {
            soft: 1024,
            hard: 1024,
        };
        let mut fitting = [("--max-connections", 800), ("--grpc-max-connections", 96)];
        files.fit(&mut fitting);
        assert_eq!(
            fitting,
            [("--max-connections", 800), ("--grpc-max-connections", 96)]
        );
        let mut limits = [("--max-connections", 1024), ("--grpc-max-connections", 256)];
        files.fit(&mut limits);
        // 896 descriptors for 1280 asked: 70% each.
        assert_eq!(
            limits,
            [("--max-connections", 716), ("--grpc-max-connections", 179)]
        );
        let tiny = OpenFiles { soft: 16, hard: 16 };
        let mut one = [("--max-connections", 10)];
        tiny.fit(&mut one);
        assert_eq!(one, [("--max-connections", 1)]);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let before = rlimit::Resource::NOFILE.get().unwrap();
        let after = OpenFiles::raise().unwrap();
        assert!(after.soft >= before.0);
        assert_eq!(after.hard, before.1);
    }
}
