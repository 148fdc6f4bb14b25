//! The world a process belongs to, from the environment variables torchrun sets (and
//! `llmtool train --gpus N` sets for the processes it starts): `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, plus
//! `LLMTOOL_COLLECTIVE_TIMEOUT`.

use std::time::Duration;

/// PyTorch's default rendezvous port.
pub const DEFAULT_PORT: u16 = 29500;

/// How long a rank waits for another before giving up, unless `LLMTOOL_COLLECTIVE_TIMEOUT`
/// says otherwise: gloo's default (NCCL's is 10 minutes), long enough for rank 0 to write a
/// large checkpoint while the others wait at the next step.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// A variable that is set but does not hold what it must.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}={value:?}: {expected}")]
pub struct EnvError {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What it must hold.
    pub expected: String,
}

/// This process's place in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEnv {
    /// This process's rank, from 0 (rank 0 writes the run directory).
    pub rank: usize,
    /// Processes in the run, on all machines.
    pub world_size: usize,
    /// This process's rank among those of its machine: the GPU it trains on.
    pub local_rank: usize,
    /// Ranks on this machine (`LOCAL_WORLD_SIZE`; all of them when unset).
    pub local_world_size: usize,
    /// Where rank 0 listens: `MASTER_ADDR` (default 127.0.0.1).
    pub master_addr: String,
    /// `MASTER_PORT` (default 29500).
    pub master_port: u16,
    /// How long to wait for another rank.
    pub timeout: Duration,
}

impl WorldEnv {
    /// The world `vars` describe (`std::env::var` for the real environment), or `None` when
    /// `WORLD_SIZE` is unset or 1 (an ordinary run).
    pub fn from_vars(vars: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, EnvError> {
        let number =
            |name: &'static str, below: Option<usize>| -> Result<Option<usize>, EnvError> {
                let Some(value) = vars(name) else {
                    return Ok(None);
                };
                let expected = match below {
                    Some(limit) => format!("a whole number below {limit}"),
                    None => "a whole number of at least 1".to_string(),
                };
                let fits = |n: usize| match below {
                    Some(limit) => n < limit,
                    None => n >= 1,
                };
                match value.trim().parse::<usize>() {
                    Ok(n) if fits(n) => Ok(Some(n)),
                    _ => Err(EnvError {
                        name,
                        value,
                        expected,
                    }),
                }
            };
        let world_size = match number("WORLD_SIZE", None)? {
            None | Some(1) => return Ok(None),
            Some(n) => n,
        };
        let rank = number("RANK", Some(world_size))?.ok_or_else(|| EnvError {
            name: "RANK",
            value: String::new(),
            expected: format!("set to this process's rank (WORLD_SIZE is {world_size})"),
        })?;
        let local_rank = number("LOCAL_RANK", Some(world_size))?.unwrap_or(rank);
        let local_world_size = match number("LOCAL_WORLD_SIZE", None)? {
            None => world_size,
            Some(n) if world_size % n == 0 && local_rank < n => n,
            Some(n) => {
                return Err(EnvError {
                    name: "LOCAL_WORLD_SIZE",
                    value: n.to_string(),
                    expected: format!(
                        "a divisor of WORLD_SIZE {world_size} above LOCAL_RANK {local_rank}"
                    ),
                })
            }
        };
        let master_port = match vars("MASTER_PORT") {
            None => DEFAULT_PORT,
            Some(value) => value.trim().parse().map_err(|_| EnvError {
                name: "MASTER_PORT",
                value,
                expected: "a TCP port number".into(),
            })?,
        };
        let timeout = match vars("LLMTOOL_COLLECTIVE_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(value) => match value.trim().parse::<u64>() {
                Ok(seconds) if seconds > 0 => Duration::from_secs(seconds),
                _ => {
                    return Err(EnvError {
                        name: "LLMTOOL_COLLECTIVE_TIMEOUT",
                        value,
                        expected: "seconds, at least 1".into(),
                    })
                }
            },
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr: vars("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            timeout,
        }))
    }

    /// The world of this process's environment.
    pub fn from_process() -> Result<Option<Self>, EnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Machines in the run.
    pub fn machines(&self) -> usize {
        self.world_size / self.local_world_size
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(pairs: &[(&str, &str)]) -> Result<Option<WorldEnv>, EnvError> {
        WorldEnv::from_vars(|name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn no_world_size_or_one_is_an_ordinary_run() {
        assert_eq!(world(&[]).unwrap(), None);
        assert_eq!(world(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
    }

    #[test]
    fn torchruns_variables_are_read_with_its_defaults() {
        let w = world(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1")])
            .unwrap()
            .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (3, 4, 1));
        assert_eq!((w.local_world_size, w.machines()), (4, 1));
        assert_eq!(w.master(), "127.0.0.1:29500");
        assert_eq!(w.timeout, DEFAULT_TIMEOUT);
        let w = world(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "4000"),
            ("LLMTOOL_COLLECTIVE_TIMEOUT", "5"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.local_rank, w.master()), (1, "node0:4000".to_string()));
        assert_eq!(w.timeout, Duration::from_secs(5));
        let w = world(&[
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(w.machines(), 2);
    }

    #[test]
    fn a_bad_variable_is_named() {
        for (pairs, name) in [
            (vec![("WORLD_SIZE", "two")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "0")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")],
                "MASTER_PORT",
            ),
            (
                vec![
                    ("WORLD_SIZE", "2"),
                    ("RANK", "0"),
                    ("LLMTOOL_COLLECTIVE_TIMEOUT", "0"),
                ],
                "LLMTOOL_COLLECTIVE_TIMEOUT",
            ),
            (
                vec![
                    ("WORLD_SIZE", "6"),
                    ("RANK", "0"),
                    ("LOCAL_WORLD_SIZE", "4"),
                ],
                "LOCAL_WORLD_SIZE",
            ),
        ] {
            let err = world(&pairs).unwrap_err();
            assert_eq!(err.name, name, "{err}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}
