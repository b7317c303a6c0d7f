//! libgomp reads `OMP_WAIT_POLICY` once, as it loads (before `main`), and
//! by default its idle threads spin for a while before they sleep. A router
//! whose experts are remote waits on its workers for most of every layer;
//! spinning there takes the cores of any worker on the same host (`serve`
//! runs them all on one). So the commands that dispatch re-run themselves
//! once with `OMP_WAIT_POLICY=PASSIVE`, unless the variable is set already
//! (set it to ACTIVE to keep spinning).

use std::os::unix::process::CommandExt;

const VARIABLE: &str = "OMP_WAIT_POLICY";

/// Returns at once when `OMP_WAIT_POLICY` is set; otherwise replaces this
/// process by the same command with it set to PASSIVE (same pid, arguments
/// and standard streams). If that cannot be done it says so on stderr and
/// returns: the command runs on, spinning.
pub fn passive_while_dispatching() {
    if std::env::var_os(VARIABLE).is_some() {
        return;
    }
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(VARIABLE, "PASSIVE")
            .exec(),
        Err(error) => error,
    };
    eprintln!(
        "warning: cannot re-run with {VARIABLE}=PASSIVE ({error}); idle OpenMP threads will spin"
    );
}
