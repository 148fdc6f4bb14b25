//! `llmtool train --gpus N` end to end on the CPU: the real binary starts N processes that meet
//! at a TCP rendezvous, split every step's windows, sum their gradients and let rank 0 write.

mod common;

use common::{
    assert_two_ranks_train_as_one_process, llmtool, loss_curves as curves, tiny_training_run,
};
use predicates::prelude::*;
use std::path::Path;

#[test]
fn two_processes_train_the_run_one_process_trains_with_twice_the_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_training_run(dir.path());
    let steps = ["--set", "training.max_steps=6", "--device", "cpu"];
    llmtool()
        .args(["train", &config, "--gpus", "2"])
        .args(steps)
        .assert()
        .success()
        .stderr(predicate::str::contains("on 2 ranks"))
        .stdout(predicate::str::contains("training finished"));
    assert_two_ranks_train_as_one_process(dir.path(), &[&["train", &config][..], &steps].concat());
    let run = dir.path().join("run");
    assert_eq!(
        curves(&run).0.len(),
        6,
        "one line a step: rank 0 alone writes"
    );
    assert!(run.join("model/model.safetensors").is_file());

    // Paused at step 3 and resumed by two processes, the run ends as the whole one did.
    let split = dir.path().join("split");
    let split_dir = format!("output.dir={}", split.display());
    llmtool()
        .args(["train", &config, "--gpus", "2", "--set", &split_dir])
        .args(steps)
        .args(["--stop-after-steps", "3"])
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "resume with  llmtool train --gpus 2 --resume {}",
            split.display()
        )));
    let resume = ["train", "--resume", split.to_str().unwrap()];
    llmtool()
        .args(resume)
        .args(["--device", "cpu"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "trained by 2 processes and this run has 1 process",
        ))
        .stderr(predicate::str::contains("--gpus 2"));
    llmtool()
        .args(resume)
        .args(["--gpus", "2", "--device", "cpu"])
        .assert()
        .success()
        .stdout(predicate::str::contains("training finished"));
    assert_eq!(curves(&split), curves(&run), "resumed bit for bit");
}

/// Two "machines" (two launchers on this one, one rank each) meet at node 0's address and
/// train the run one process trains with twice the accumulation.
#[test]
fn two_nodes_meet_at_the_master_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_training_run(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let node = |rank: &str| {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("llmtool"))
            .args(["train", &config, "--device", "cpu", "--gpus", "1"])
            .args(["--nnodes", "2", "--node-rank", rank])
            .args(["--master-addr", "127.0.0.1", "--master-port", &port])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Node 1 first: its rank waits for rank 0 to listen.
    let second = node("1");
    let first = node("0").wait_with_output().unwrap();
    let second = second.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("training finished"));
    assert_two_ranks_train_as_one_process(dir.path(), &["train", &config, "--device", "cpu"]);
}

#[test]
fn a_rank_that_cannot_start_stops_the_run_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_training_run(dir.path());
    llmtool()
        .args(["train", &config, "--device", "cpu"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "2")
        .assert()
        .failure()
        .stderr(predicate::str::contains("RANK=\"2\""))
        .stderr(predicate::str::contains("below 2"));
    assert!(!dir.path().join("run").exists(), "nothing written");
    // Rank 1 alone finds no rank 0 and gives up after the timeout, naming the address.
    llmtool()
        .args(["train", &config, "--device", "cpu"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env("MASTER_PORT", "9")
        .env("LLMTOOL_COLLECTIVE_TIMEOUT", "1")
        .assert()
        .failure()
        .stderr(predicate::str::contains("rendezvous at 127.0.0.1:9"))
        .stderr(predicate::str::contains("could not reach rank 0"));
    assert!(!dir.path().join("run").exists(), "nothing written");
}

/// Starts a long two-process run and waits until rank 0 logged two steps.
#[cfg(target_os = "linux")]
fn long_two_rank_run(dir: &Path, config: &str) -> std::process::Child {
    common::start_logging_run(
        dir,
        &[
            "train",
            config,
            "--gpus",
            "2",
            "--device",
            "cpu",
            "--set",
            "training.max_steps=100000",
            "--set",
            "training.save_every=100000",
        ],
    )
}

/// The pid of the launcher `parent`'s rank `rank`, from the ranks' environments.
#[cfg(target_os = "linux")]
fn rank_pid(parent: u32, rank: usize) -> String {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap();
    children
        .split_whitespace()
        .find(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            environ
                .split(|b| *b == 0)
                .any(|var| var == format!("RANK={rank}").as_bytes())
        })
        .unwrap_or_else(|| panic!("no rank {rank} among {children}"))
        .to_string()
}

/// SIGTERM to the launcher (what `timeout` and schedulers send) reaches every rank; they stop
/// after the same step, rank 0 saves the checkpoint, and the run resumes.
#[cfg(target_os = "linux")]
#[test]
fn sigterm_to_the_launcher_checkpoints_and_exits_143() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_training_run(dir.path());
    let child = long_two_rank_run(dir.path(), &config);
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    assert!(
        stderr.contains("resume with `llmtool train --gpus 2 --resume"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[rank 1] error: interrupted: stopped with the other ranks"),
        "{stderr}"
    );
    let run = dir.path().join("run");
    llmtool()
        .args(["train", "--resume", run.to_str().unwrap()])
        .args(["--gpus", "2", "--device", "cpu", "--stop-after-steps", "1"])
        .assert()
        .success()
        .stdout(predicate::str::contains("training paused"));
}

/// A rank killed outright (out of memory, a lost machine) stops the others with a message
/// naming it instead of leaving them waiting; the last checkpoint stays as it was.
#[cfg(target_os = "linux")]
#[test]
fn a_killed_rank_stops_the_others_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_training_run(dir.path());
    let child = long_two_rank_run(dir.path(), &config);
    let rank_one = rank_pid(child.id(), 1);
    std::process::Command::new("kill")
        .args(["-KILL", &rank_one])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rank 1 of 2 stopped"), "{stderr}");
    assert!(
        stderr.contains("error: rank 0 exited with code 1; rank 1 was killed by signal 9"),
        "{stderr}"
    );
}

/// A launcher killed outright (`kill -9`) takes its ranks with it: they get SIGTERM, stop after
/// the same step with rank 0's checkpoint and release the run directory, which resumes.
#[cfg(target_os = "linux")]
#[test]
fn killing_the_launcher_stops_its_ranks_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_training_run(dir.path());
    let mut launcher = long_two_rank_run(dir.path(), &config);
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let run = dir.path().join("run");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let resumed = llmtool()
            .args(["train", "--resume", run.to_str().unwrap()])
            .args(["--gpus", "2", "--device", "cpu", "--stop-after-steps", "1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&resumed.stderr);
        if stderr.contains("is in use by process") {
            assert!(
                std::time::Instant::now() < deadline,
                "the ranks kept running"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        assert!(resumed.status.success(), "{stderr}");
        assert!(String::from_utf8_lossy(&resumed.stdout).contains("training paused"));
        break;
    }
}
