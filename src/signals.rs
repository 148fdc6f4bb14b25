//! Ctrl-C, SIGTERM and SIGHUP (what `timeout`, Slurm, `docker stop` and Kubernetes send, and
//! what a closed terminal sends) ask a training run to save a checkpoint and stop. The run
//! exits with 128 + the signal's number, as a shell reports a process that signal ended.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// The signals that stop a run after a checkpoint.
#[cfg(unix)]
const STOP_SIGNALS: [i32; 3] = [
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
];
#[cfg(not(unix))]
const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM];

/// From now on, the stop signals set the returned flag to their number instead of ending the
/// process; a second signal while the checkpoint is written changes nothing.
pub fn stop_requests() -> std::io::Result<Arc<AtomicUsize>> {
    let flag = Arc::new(AtomicUsize::new(0));
    for signal in STOP_SIGNALS {
        signal_hook::flag::register_usize(signal, flag.clone(), signal as usize)?;
    }
    Ok(flag)
}
