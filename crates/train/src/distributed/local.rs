//! N ranks as threads of one process: the in-process stand-in for the transport, with which
//! the tests run the real training loop on several ranks without GPUs or sockets.

use super::{encode, sum_gathered, Collective, CollectiveError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The ranks of one in-process world; hand one to each thread.
pub struct LocalGroup;

impl LocalGroup {
    /// `world` connected ranks, rank `r` at index `r`.
    pub fn ranks(world: usize) -> Vec<LocalRank> {
        let shared = Arc::new(Shared {
            world,
            round: Mutex::new(Round::new(world)),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| LocalRank {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

struct Shared {
    world: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

/// One exchange in progress: the messages deposited so far, then the result until every rank
/// has taken it.
struct Round {
    messages: Vec<Option<Vec<u8>>>,
    result: Option<Arc<Vec<Vec<u8>>>>,
    taken: usize,
    /// A rank that went away (its handle was dropped).
    left: Option<usize>,
}

impl Round {
    fn new(world: usize) -> Self {
        Self {
            messages: vec![None; world],
            result: None,
            taken: 0,
            left: None,
        }
    }
}

/// One rank of a [`LocalGroup`]. Dropping it (its thread ended or failed) makes the other
/// ranks' next operation fail with [`CollectiveError::PeerLost`] instead of waiting forever.
pub struct LocalRank {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalRank {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked holding the lock left the round as it was; carry on with it.
        self.shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Round>) -> MutexGuard<'a, Round> {
        self.shared
            .changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn peer_lost(&self, rank: usize) -> CollectiveError {
        CollectiveError::PeerLost {
            rank,
            world: self.shared.world,
        }
    }
}

impl Collective for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&self, message: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let mut round = self.lock();
        // The previous exchange's result is still being taken by slower ranks.
        while round.result.is_some() {
            if let Some(rank) = round.left {
                return Err(self.peer_lost(rank));
            }
            round = self.wait(round);
        }
        round.messages[self.rank] = Some(message.to_vec());
        if round.messages.iter().all(Option::is_some) {
            let all = round.messages.iter_mut().filter_map(Option::take).collect();
            round.result = Some(Arc::new(all));
            self.shared.changed.notify_all();
        }
        let result = loop {
            if let Some(result) = &round.result {
                break result.clone();
            }
            if let Some(rank) = round.left {
                return Err(self.peer_lost(rank));
            }
            round = self.wait(round);
        };
        round.taken += 1;
        if round.taken == self.shared.world {
            round.result = None;
            round.taken = 0;
            self.shared.changed.notify_all();
        }
        Ok(result.to_vec())
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let messages = self.all_gather(&encode(values))?;
        values.copy_from_slice(&sum_gathered(&messages, values.len())?);
        Ok(())
    }
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        let mut round = self.lock();
        round.left.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_gets_the_same_sum_and_everyones_messages() {
        let ranks = LocalGroup::ranks(3);
        let results: Vec<(Vec<f32>, Vec<Vec<u8>>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        let mut last = (Vec::new(), Vec::new());
                        // Several rounds in a row: a fast rank must not overtake a slow one.
                        for round in 0..20 {
                            let mut values = vec![r.rank() as f32 + round as f32, 0.1];
                            r.all_reduce_sum(&mut values).unwrap();
                            let gathered = r.all_gather(&[r.rank() as u8; 2]).unwrap();
                            last = (values, gathered);
                        }
                        last
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected_sum = 0.0 + 19.0 + 1.0 + 19.0 + 2.0 + 19.0;
        for (values, gathered) in &results {
            assert_eq!(values[0], expected_sum);
            assert_eq!(values[1].to_bits(), results[0].0[1].to_bits());
            assert_eq!(gathered, &vec![vec![0, 0], vec![1, 1], vec![2, 2]]);
        }
    }

    #[test]
    fn a_rank_that_goes_away_stops_the_others() {
        let mut ranks = LocalGroup::ranks(2);
        let gone = ranks.pop().unwrap();
        drop(gone);
        let err = ranks[0].all_gather(b"x").unwrap_err();
        assert!(
            matches!(err, CollectiveError::PeerLost { rank: 1, .. }),
            "{err}"
        );
    }
}
