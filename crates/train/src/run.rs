//! A run directory and its rules: one process writes it at a time (a lock naming its pid),
//! what a killed process left in it is cleaned up at the next start, a new run may start only
//! where no checkpoint would be lost (`--force` keeps the old run aside until the new one has a
//! checkpoint), which config changes a resume refuses, and the threads a run trains on.

use crate::state::STATE_FILE;
use config::Config;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The resolved config of a run, as saved in its directory.
pub const RUN_CONFIG: &str = "config.yaml";

/// The lock file a running process holds in its run directory.
pub const LOCK_FILE: &str = "llmtool.lock";

/// The fingerprint of the training data a run started on (its dataset manifest's, or its
/// examples'), which `--resume` must find again.
pub const DATA_PIN: &str = "data.fingerprint";

/// Where `--force` keeps the run it replaces until the new run saves its first checkpoint.
pub const REPLACED_RUN: &str = ".replaced-run";

/// Why a run cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The directory holds a checkpoint and neither resuming nor starting over was asked for.
    #[error("{} already holds a run with a checkpoint: continue it with `llmtool {command} --resume {}`, or start over with --force", dir.display(), dir.display())]
    Occupied {
        /// The run directory.
        dir: PathBuf,
        /// The command to resume with (`train` or `finetune`).
        command: String,
    },
    /// Another process is writing the run directory.
    #[error("{} is in use by process {pid} (lock file {}): wait for it to finish, or stop it", dir.display(), dir.join(LOCK_FILE).display())]
    Locked {
        /// The run directory.
        dir: PathBuf,
        /// The id of the process holding the lock, as its lock file records it (`?` if empty).
        pid: String,
    },
    /// The directory could not be created, locked or tidied.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The training threads could not start.
    #[error("starting the training threads: {0}")]
    Threads(String),
    /// The training thread panicked.
    #[error("the training thread panicked")]
    Panicked,
}

/// A run directory that this process holds for the length of a run: locked against other
/// writers, tidied of what a killed run left. Dropping it settles a `--force` replacement:
/// the old run is deleted if the new one saved a checkpoint, and put back otherwise.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    /// Whether opening it created it (a run that fails before its first checkpoint removes it).
    created: bool,
    /// Held (an OS lock, released when the process ends, however it ends) while this lives.
    _lock: File,
}

impl RunDir {
    /// Creates `path` if needed and locks it; fails with [`RunError::Locked`], naming the
    /// holder's pid, while another process holds it. Then removes the temporary files a killed
    /// process left, and settles a replacement that a killed `--force` run left unfinished.
    pub fn open(path: &Path) -> Result<Self, RunError> {
        let io = |p: &Path| {
            let path = p.to_path_buf();
            move |source| RunError::Io { path, source }
        };
        let created = !path.exists();
        std::fs::create_dir_all(path).map_err(io(path))?;
        let lock_path = path.join(LOCK_FILE);
        let mut lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        if let Err(e) = lock.try_lock() {
            return Err(match e {
                std::fs::TryLockError::WouldBlock => {
                    let mut pid = String::new();
                    let _ = lock.read_to_string(&mut pid);
                    let pid = pid.trim().to_string();
                    RunError::Locked {
                        dir: path.to_path_buf(),
                        pid: if pid.is_empty() { "?".into() } else { pid },
                    }
                }
                std::fs::TryLockError::Error(source) => RunError::Io {
                    path: lock_path,
                    source,
                },
            });
        }
        lock.set_len(0).map_err(io(&lock_path))?;
        lock.rewind().map_err(io(&lock_path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io(&lock_path))?;
        let run = Self {
            path: path.to_path_buf(),
            created,
            _lock: lock,
        };
        run.remove_leftovers().map_err(io(path))?;
        run.settle_replacement().map_err(io(path))?;
        Ok(run)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fingerprint of the training data this run started on, if it recorded one.
    pub fn data_pin(&self) -> Result<Option<String>, RunError> {
        let path = self.path.join(DATA_PIN);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(RunError::Io { path, source }),
        }
    }

    /// Records the fingerprint of the training data a new run starts on, which a resume must
    /// find again.
    pub fn pin_data(&self, fingerprint: &str) -> Result<(), RunError> {
        let path = self.path.join(DATA_PIN);
        model::weights::write_atomic(&path, format!("{fingerprint}\n").as_bytes())
            .map_err(|source| RunError::Io { path, source })
    }

    /// Whether the run has saved a checkpoint it can resume from.
    pub fn has_checkpoint(&self) -> bool {
        self.path.join(STATE_FILE).is_file()
    }

    /// Applies the rules for starting a run here: resuming is always allowed (from step 0
    /// when no checkpoint was saved yet); a new run is refused where a checkpoint exists unless
    /// `force`, which moves the old run aside until the new one saves its first checkpoint.
    /// `command` is how the user continues the run, for the message.
    pub fn admit(&self, resume: bool, force: bool, command: &str) -> Result<(), RunError> {
        if resume || !self.has_checkpoint() {
            return Ok(());
        }
        if !force {
            return Err(RunError::Occupied {
                dir: self.path.clone(),
                command: command.to_string(),
            });
        }
        self.set_aside().map_err(|source| RunError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Moves everything but the lock into [`REPLACED_RUN`].
    fn set_aside(&self) -> std::io::Result<()> {
        let aside = self.path.join(REPLACED_RUN);
        std::fs::create_dir(&aside)?;
        for entry in self.own_entries()? {
            std::fs::rename(&entry, aside.join(entry.file_name().unwrap_or_default()))?;
        }
        Ok(())
    }

    /// Finishes a `--force` replacement: deletes the old run once the new one has a
    /// checkpoint, or else puts the old run back in place of what the new one wrote.
    fn settle_replacement(&self) -> std::io::Result<()> {
        let aside = self.path.join(REPLACED_RUN);
        if !aside.is_dir() {
            return Ok(());
        }
        if self.has_checkpoint() {
            return std::fs::remove_dir_all(&aside);
        }
        for entry in self.own_entries()? {
            remove_path(&entry)?;
        }
        for entry in std::fs::read_dir(&aside)? {
            let entry = entry?.path();
            std::fs::rename(
                &entry,
                self.path.join(entry.file_name().unwrap_or_default()),
            )?;
        }
        std::fs::remove_dir(&aside)
    }

    /// The run's files and folders: everything but the lock and what is set aside.
    fn own_entries(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default();
            if name != LOCK_FILE && name != REPLACED_RUN {
                entries.push(path);
            }
        }
        Ok(entries)
    }

    /// Removes what a process killed while writing left: temporary files of atomic writes
    /// (`.tmp*`), model directories being staged (`.model-*`), and the previous copy of a
    /// model directory that was being replaced (`X.old`: put back where `X` is missing, which
    /// is the directory the last checkpoint goes with). Only the lock holder writes here, so
    /// nothing of a live process is touched.
    fn remove_leftovers(&self) -> std::io::Result<()> {
        for entry in self.own_entries()? {
            let name = entry.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with(".tmp") || name.starts_with(".model-") {
                remove_path(&entry)?;
            } else if let Some(base) = name
                .strip_suffix(".old")
                .filter(|base| ["model", "best", "adapter"].contains(base))
            {
                let current = self.path.join(base);
                if current.exists() {
                    remove_path(&entry)?;
                } else {
                    std::fs::rename(&entry, current)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Best effort: what fails here is settled again at the next start.
        let _ = self.settle_replacement();
        // A run ends with a checkpoint, however it ends (finished, paused, interrupted); a
        // command that failed before its first one leaves no directory it created behind.
        if self.created && !self.has_checkpoint() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes a file or a whole folder.
fn remove_path(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Keys whose change makes a saved state unusable or the resumed run not a continuation.
pub fn incompatible_keys(saved: &Config, given: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if saved.model != given.model {
        keys.push("model.*".to_string());
    }
    let (a, b) = (&saved.training, &given.training);
    for (name, same) in [
        ("training.seq_len", a.seq_len == b.seq_len),
        ("training.batch_size", a.batch_size == b.batch_size),
        ("training.grad_accum", a.grad_accum == b.grad_accum),
        ("training.seed", a.seed == b.seed),
        ("training.sampling", a.sampling == b.sampling),
    ] {
        if !same {
            keys.push(name.to_string());
        }
    }
    if saved.data != given.data {
        keys.push("data.*".to_string());
    }
    keys
}

/// Runs `f` on a worker of a rayon pool whose threads have 256 MiB stacks: candle's backward
/// pass and tensor drops recurse once per graph node. Inside the pool, every parallel kernel and
/// GEMM starts on this thread and hands only its other half to another worker; from outside it
/// would hand all of it over and sleep until woken, two thread switches per op.
pub fn on_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, RunError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .stack_size(256 << 20)
        .build()
        .map_err(|e| RunError::Threads(e.to_string()))?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(f)))
        .map_err(|_| RunError::Panicked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_second_writer_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunDir::open(dir.path()).unwrap();
        let err = RunDir::open(dir.path()).unwrap_err();
        let pid = std::process::id().to_string();
        assert!(
            matches!(&err, RunError::Locked { pid: p, .. } if *p == pid),
            "{err}"
        );
        assert!(err.to_string().contains(&pid), "{err}");
        drop(first);
        RunDir::open(dir.path()).unwrap();
    }

    #[test]
    fn a_checkpoint_is_never_replaced_without_force() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join(RUN_CONFIG), "old");
        let run = RunDir::open(dir.path()).unwrap();
        // Killed before its first checkpoint: nothing to lose, a new run may start.
        run.admit(false, false, "train").unwrap();
        write(&dir.path().join(STATE_FILE), "state");
        let err = run.admit(false, false, "finetune --lora").unwrap_err();
        assert!(
            err.to_string().contains("llmtool finetune --lora --resume"),
            "{err}"
        );
        run.admit(true, false, "train").unwrap();
    }

    #[test]
    fn force_puts_the_old_run_back_unless_the_new_one_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join(STATE_FILE), "old state");
        write(&root.join("model/config.json"), "old model");
        let run = RunDir::open(root).unwrap();
        run.admit(false, true, "train").unwrap();
        assert!(!run.has_checkpoint() && !root.join("model").exists());
        write(&root.join(RUN_CONFIG), "new config");
        drop(run); // the new run failed before its first checkpoint
        assert_eq!(
            std::fs::read_to_string(root.join(STATE_FILE)).unwrap(),
            "old state"
        );
        assert!(root.join("model/config.json").is_file());
        assert!(!root.join(RUN_CONFIG).exists() && !root.join(REPLACED_RUN).exists());

        let run = RunDir::open(root).unwrap();
        run.admit(false, true, "train").unwrap();
        write(&root.join(STATE_FILE), "new state");
        drop(run);
        assert_eq!(
            std::fs::read_to_string(root.join(STATE_FILE)).unwrap(),
            "new state"
        );
        assert!(!root.join("model").exists() && !root.join(REPLACED_RUN).exists());
    }

    #[test]
    fn a_killed_replacement_is_undone_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join(REPLACED_RUN).join(STATE_FILE), "old state");
        write(&root.join(RUN_CONFIG), "config of the killed new run");
        let run = RunDir::open(root).unwrap();
        assert!(run.has_checkpoint());
        assert!(!root.join(RUN_CONFIG).exists());
    }

    #[test]
    fn leftovers_of_a_killed_process_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(&root.join(".tmpA1b2C3"), "half a state");
        write(&root.join(".model-x1/model.safetensors"), "half a model");
        write(
            &root.join("model.old/config.json"),
            "the model of the last checkpoint",
        );
        write(&root.join("best/config.json"), "best");
        write(&root.join("best.old/config.json"), "older best");
        write(&root.join("notes.old"), "not ours");
        RunDir::open(root).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["best", LOCK_FILE, "model", "notes.old"]);
        assert!(root.join("model/config.json").is_file());
    }

    #[test]
    fn a_run_that_wrote_nothing_leaves_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("runs/new");
        drop(RunDir::open(&root).unwrap());
        assert!(!root.exists());
    }
}
