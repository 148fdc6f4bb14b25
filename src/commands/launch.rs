//! `train|finetune|bench --gpus N`: this process becomes the launcher of N copies of itself,
//! one per GPU (or CPU share), each told its place through the environment variables torchrun
//! sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`).
//! It passes stop signals on, prefixes the other ranks' output with their rank, stops the
//! others when one fails, takes them down with it if it is killed (Linux), and exits with the
//! status of the rank that failed (0 when none did).

use crate::cli::LaunchArgs;
use crate::RanksFailed;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use config::DeviceSpec;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;
use train::distributed::env::{WorldEnv, DEFAULT_PORT};
use train::distributed::{self, Collective};

/// This process's place in a run: its world (`None` for a single process), the device it
/// computes on, and its connection to the other ranks.
pub struct Rank {
    /// The world the environment names.
    pub world: Option<WorldEnv>,
    /// The opened device; a rank whose device computes on CUDA gets `cuda:LOCAL_RANK`.
    pub device: Device,
    /// The other ranks ([`train::distributed::Single`] for a single process).
    pub collective: Box<dyn Collective>,
}

/// Opens the device `spec` names (a rank's own GPU) and joins the world the environment names.
pub fn join_run(spec: DeviceSpec) -> Result<Rank> {
    let world = WorldEnv::from_process()?;
    let spec = match &world {
        Some(w) if ops::device::computes_on_cuda(spec) => DeviceSpec::Cuda(w.local_rank),
        _ => spec,
    };
    let device = ops::device::open(spec)?;
    let collective = distributed::join(world.as_ref(), &device).with_context(|| {
        let (rank, size) = world.as_ref().map_or((0, 1), |w| (w.rank, w.world_size));
        format!("rank {rank} of {size} joining the run")
    })?;
    Ok(Rank {
        world,
        device,
        collective,
    })
}

/// Starts the ranks of this machine and waits for them when `args` asks for more than one
/// process and this process is not itself a rank (its environment names no world). Returns
/// `false` when this process should train itself.
pub fn launched(args: &LaunchArgs) -> Result<bool> {
    let Some(per_node) = args.gpus.map(usize::from) else {
        return Ok(false);
    };
    if WorldEnv::from_process()?.is_some() {
        return Ok(false);
    }
    let (nodes, node) = (usize::from(args.nnodes), usize::from(args.node_rank));
    if node >= nodes {
        bail!("--node-rank {node}: must be below --nnodes {nodes}");
    }
    let world = nodes * per_node;
    if world == 1 {
        return Ok(false);
    }
    let addr = args
        .master_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = match (args.master_port, nodes) {
        (Some(port), _) => port,
        (None, 1) => free_port(&addr)?,
        (None, _) => DEFAULT_PORT,
    };
    let exe = std::env::current_exe().context("finding this program to start the ranks")?;
    let stop = crate::signals::stop_requests().context("installing the signal handlers")?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut ranks = Vec::with_capacity(per_node);
    let mut copies = Vec::new();
    for local in 0..per_node {
        let rank = node * per_node + local;
        let mut command = Command::new(&exe);
        command
            .args(std::env::args_os().skip(1))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", per_node.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string());
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // The ranks of a CPU run share the cores instead of each taking all of them.
            let share = (threads / per_node).max(1);
            command.env("RAYON_NUM_THREADS", share.to_string());
        }
        if rank != 0 {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        stop_with_launcher(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        if rank != 0 {
            copies.extend(prefix_output(&mut child, rank));
        }
        ranks.push((rank, child));
    }
    let (statuses, killed) = wait_passing_signals(&mut ranks, &stop, GRACE_AFTER_FAILURE)?;
    // The ranks' last lines (their errors) are printed before this process ends.
    for copy in copies {
        let _ = copy.join();
    }
    let failures = failures(statuses, &killed, GRACE_AFTER_FAILURE);
    match failures.first() {
        None => Ok(true),
        Some((code, _)) => Err(RanksFailed {
            code: *code,
            message: failures
                .iter()
                .map(|(_, what)| what.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        }
        .into()),
    }
}

/// Makes a rank get SIGTERM when this launcher dies, however it dies (`kill -9` included): the
/// ranks then stop after the same step with rank 0's checkpoint, instead of training on as
/// orphans that hold the run directory.
#[cfg(target_os = "linux")]
fn stop_with_launcher(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; prctl, getppid and raise are
    // async-signal-safe and touch no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died before the line above: no signal would come.
            if libc::getppid() != launcher {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
}

/// Elsewhere a rank outlives a killed launcher (it still stops when a peer goes away).
#[cfg(not(target_os = "linux"))]
fn stop_with_launcher(_command: &mut Command) {}

/// A port nobody listens on at `addr` now (the ranks start at once, so it stays free).
fn free_port(addr: &str) -> Result<u16> {
    let listener = std::net::TcpListener::bind((addr, 0))
        .with_context(|| format!("finding a free port on {addr} for the ranks"))?;
    Ok(listener.local_addr()?.port())
}

/// Copies a rank's stdout and stderr to ours, a line at a time, each line prefixed
/// `[rank R] `, on threads that end when the rank closes them.
fn prefix_output(child: &mut Child, rank: usize) -> Vec<JoinHandle<()>> {
    fn copy(from: impl Read + Send + 'static, rank: usize, to_stdout: bool) -> JoinHandle<()> {
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                let line = format!("[rank {rank}] {line}\n");
                // Our own output gone (a closed pipe) is no reason to stop a rank.
                let _ = match to_stdout {
                    true => std::io::stdout().write_all(line.as_bytes()),
                    false => std::io::stderr().write_all(line.as_bytes()),
                };
            }
        })
    }
    let out = child.stdout.take().map(|out| copy(out, rank, true));
    let err = child.stderr.take().map(|err| copy(err, rank, false));
    out.into_iter().chain(err).collect()
}

/// A rank and how its process ended.
type RankStatus = (usize, ExitStatus);

/// How long the other ranks get to stop after one failed and they were sent SIGTERM, before
/// they are killed: a rank blocked in a collective with the failed one (an NCCL sum waits for
/// it without end) never gets to act on the signal, and no rank can finish a step without the
/// failed one. A checkpoint being written when its writer is killed is lost, not corrupted
/// (checkpoints are replaced by a rename).
const GRACE_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// Waits for every rank, passing on a stop signal this process receives (Ctrl-C reaches the
/// ranks from the terminal too; SIGTERM from a scheduler reaches only us). The ranks agree to
/// stop after the same step, and rank 0 saves the checkpoint. A rank that fails (rather than
/// stops on a signal) gets the others SIGTERM, as torchrun does: one still waiting at the
/// rendezvous for it would otherwise wait out the whole timeout, and one training saves its
/// checkpoint and stops. Ranks still running `grace` after a failure are killed (SIGKILL);
/// returns every rank's status and the ranks killed so.
fn wait_passing_signals(
    ranks: &mut [(usize, Child)],
    stop: &std::sync::atomic::AtomicUsize,
    grace: Duration,
) -> Result<(Vec<RankStatus>, Vec<usize>)> {
    let mut statuses: Vec<RankStatus> = Vec::new();
    let (mut passed_on, mut failed_at, mut killed) = (false, None, Vec::new());
    while statuses.len() < ranks.len() {
        let failed = statuses.iter().any(|(_, status)| failed_on_its_own(status));
        if failed && failed_at.is_none() {
            failed_at = Some(std::time::Instant::now());
        }
        let overdue = failed_at.is_some_and(|at| at.elapsed() >= grace);
        let signal = match stop.load(Ordering::SeqCst) {
            0 if failed => TERMINATE,
            signal => signal,
        };
        for (rank, child) in ranks.iter_mut() {
            if statuses.iter().any(|(r, _)| r == rank) {
                continue;
            }
            if signal != 0 && !passed_on {
                pass_on(child, signal);
            }
            if overdue && !killed.contains(rank) {
                // An error here means the rank has just ended: try_wait below collects it.
                let _ = child.kill();
                killed.push(*rank);
            }
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for rank {rank}"))?
            {
                statuses.push((*rank, status));
            }
        }
        passed_on |= signal != 0;
        std::thread::sleep(Duration::from_millis(50));
    }
    statuses.sort_by_key(|(rank, _)| *rank);
    Ok((statuses, killed))
}

/// SIGTERM's number, what a failed rank gets the others sent.
#[cfg(unix)]
const TERMINATE: usize = libc::SIGTERM as usize;
#[cfg(not(unix))]
const TERMINATE: usize = 15;

/// Whether a rank ended in failure of its own: not done, and not stopped by a stop signal
/// (SIGHUP, SIGINT or SIGTERM: exiting with 128 + its number after a checkpoint, or killed by
/// it before training began), which the ranks receive together or from this launcher.
fn failed_on_its_own(status: &ExitStatus) -> bool {
    const STOPS: [i32; 3] = [1, 2, 15];
    #[cfg(unix)]
    let killed_by_stop = {
        use std::os::unix::process::ExitStatusExt;
        status.signal().is_some_and(|s| STOPS.contains(&s))
    };
    #[cfg(not(unix))]
    let killed_by_stop = false;
    let stopped = status.code().is_some_and(|c| STOPS.contains(&(c - 128)));
    !status.success() && !stopped && !killed_by_stop
}

#[cfg(unix)]
fn pass_on(child: &Child, signal: usize) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a child's pid and one of the stop signals we registered.
        unsafe { libc::kill(pid, signal as i32) };
    }
}

#[cfg(not(unix))]
fn pass_on(_child: &Child, _signal: usize) {}

/// The ranks that ended badly, as [`failure`] describes them: those that failed on their own
/// first (the others were stopped for them), then by rank; a rank in `killed` was killed by
/// the launcher, `grace` after the SIGTERM.
fn failures(
    mut statuses: Vec<RankStatus>,
    killed: &[usize],
    grace: Duration,
) -> Vec<(i32, String)> {
    let culprit = |(rank, status): &RankStatus| failed_on_its_own(status) && !killed.contains(rank);
    statuses.sort_by_key(|ranked| (!culprit(ranked), ranked.0));
    statuses
        .iter()
        .filter_map(|ranked| {
            let (code, what) = failure(ranked)?;
            let what = match killed.contains(&ranked.0) {
                true => format!(
                    "rank {} was killed, still running {} s after the SIGTERM",
                    ranked.0,
                    grace.as_secs_f64()
                ),
                false => what,
            };
            Some((code, what))
        })
        .collect()
}

/// What happened to a rank that failed: the exit code to end with (its own, or 128 + the
/// signal that ended it) and a sentence naming it.
fn failure((rank, status): &RankStatus) -> Option<(i32, String)> {
    if status.success() {
        return None;
    }
    if let Some(code) = status.code() {
        return Some((code, format!("rank {rank} exited with code {code}")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        let signal = status.signal().unwrap_or(0);
        Some((
            128 + signal,
            format!("rank {rank} was killed by signal {signal}"),
        ))
    }
    #[cfg(not(unix))]
    Some((1, format!("rank {rank} failed")))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    fn spawn(script: &str) -> Child {
        Command::new("sh").args(["-c", script]).spawn().unwrap()
    }

    #[test]
    fn a_failed_rank_stops_the_others_at_once() {
        let mut ranks = vec![(0, spawn("sleep 30")), (1, spawn("exit 3"))];
        let started = Instant::now();
        let (statuses, killed) =
            wait_passing_signals(&mut ranks, &AtomicUsize::new(0), GRACE_AFTER_FAILURE).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "rank 0 was left waiting"
        );
        assert!(killed.is_empty(), "rank 0 stopped on the SIGTERM");
        let failures: Vec<(i32, String)> = statuses.iter().filter_map(failure).collect();
        assert_eq!(
            failures[0],
            (143, "rank 0 was killed by signal 15".to_string())
        );
        assert_eq!(failures[1], (3, "rank 1 exited with code 3".to_string()));
        assert!(!failed_on_its_own(&statuses[0].1) && failed_on_its_own(&statuses[1].1));
    }

    /// A rank that cannot act on the SIGTERM (blocked in a collective with the failed one;
    /// here it ignores the signal) is killed once the grace is over.
    #[test]
    fn a_rank_that_does_not_stop_is_killed_after_the_grace() {
        let mut ranks = vec![
            (0, spawn("trap '' TERM; exec sleep 30")),
            (1, spawn("sleep 0.2; exit 3")),
        ];
        let started = Instant::now();
        let grace = Duration::from_millis(500);
        let (statuses, killed) =
            wait_passing_signals(&mut ranks, &AtomicUsize::new(0), grace).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "rank 0 was left"
        );
        assert_eq!(killed, [0]);
        assert_eq!(
            failures(statuses, &killed, grace),
            [
                (3, "rank 1 exited with code 3".to_string()),
                (
                    137,
                    "rank 0 was killed, still running 0.5 s after the SIGTERM".to_string()
                ),
            ]
        );
    }

    #[test]
    fn ranks_stopping_on_a_signal_are_left_to_finish() {
        let mut ranks = vec![(0, spawn("sleep 1; exit 0")), (1, spawn("exit 143"))];
        let (statuses, _) =
            wait_passing_signals(&mut ranks, &AtomicUsize::new(0), GRACE_AFTER_FAILURE).unwrap();
        assert!(
            statuses[0].1.success(),
            "rank 0 saved its checkpoint undisturbed"
        );
    }
}
