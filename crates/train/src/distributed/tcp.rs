//! Ranks in separate processes (on one machine or several) connected through rank 0: the
//! other ranks connect to `MASTER_ADDR:MASTER_PORT`, send their messages to rank 0, and rank 0
//! sends back the gathered messages or the sum, added in rank order, so every rank gets the
//! same bits. A star suits the CPU runs it serves (gloo's role in PyTorch): rank 0's link
//! carries N - 1 buffers each way per reduction.

use super::env::WorldEnv;
use super::{decode_into, encode, Collective, CollectiveError, Wire};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a rank sends first, followed by its rank and world size (little-endian u64 each), and
/// what rank 0 answers when it takes the rank in.
pub const HELLO: &[u8; 8] = b"llmtool1";
/// Operation tags, checked by rank 0 so that ranks out of step fail instead of mixing data.
const GATHER: u8 = 1;
const REDUCE: u8 = 2;
/// Rank 0 adds incoming sums in pieces of this many bytes.
const PIECE: usize = 1 << 20;
/// The largest gathered message (configs, fingerprints, scalars are far smaller): a length
/// beyond it means the stream is out of step, not something to allocate.
const MAX_GATHER: u64 = 64 << 20;

/// A rank's connections: rank 0 holds one to every other rank, the others one to rank 0.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// Rank 0: the streams of ranks 1.. in order. Other ranks: the stream to rank 0.
    streams: Mutex<Vec<TcpStream>>,
}

impl TcpCollective {
    /// Makes the rendezvous `env` describes: rank 0 listens and waits for every other rank,
    /// the others connect (retrying while rank 0 is not listening yet). Both give up after
    /// `env.timeout`.
    pub fn connect(env: &WorldEnv) -> Result<Self, CollectiveError> {
        let address = env.master();
        let failed = |message: String| CollectiveError::Rendezvous {
            address: address.clone(),
            message,
        };
        let deadline = Instant::now() + env.timeout;
        let streams = if env.rank == 0 {
            let listener = TcpListener::bind(&address)
                .map_err(|e| failed(format!("rank 0 cannot listen: {e}")))?;
            accept_ranks(&listener, env, deadline).map_err(failed)?
        } else {
            vec![connect_to_root(&address, env, deadline).map_err(failed)?]
        };
        for stream in &streams {
            let set = stream
                .set_read_timeout(Some(env.timeout))
                .and(stream.set_write_timeout(Some(env.timeout)))
                .and(stream.set_nodelay(true));
            set.map_err(|e| failed(e.to_string()))?;
        }
        Ok(Self {
            rank: env.rank,
            world: env.world_size,
            timeout: env.timeout,
            streams: Mutex::new(streams),
        })
    }

    fn streams(&self) -> MutexGuard<'_, Vec<TcpStream>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The error for a failed read or write on the link to `rank`.
    fn link_error(&self, rank: usize, e: std::io::Error) -> CollectiveError {
        match e.kind() {
            ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe => CollectiveError::PeerLost {
                rank,
                world: self.world,
            },
            ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::TimedOut {
                rank,
                world: self.world,
                seconds: self.timeout.as_secs(),
            },
            _ => CollectiveError::Io { rank, source: e },
        }
    }

    /// Reads an operation header from `rank` and checks it is `op` (with `len` bytes, when
    /// given); returns the length.
    fn expect_header(
        &self,
        stream: &mut TcpStream,
        rank: usize,
        op: u8,
        len: Option<u64>,
    ) -> Result<u64, CollectiveError> {
        let mut header = [0u8; 9];
        stream
            .read_exact(&mut header)
            .map_err(|e| self.link_error(rank, e))?;
        let got = u64::from_le_bytes(header[1..].try_into().unwrap_or_default());
        let too_long = op == GATHER && got > MAX_GATHER;
        if header[0] != op || len.is_some_and(|len| len != got) || too_long {
            return Err(CollectiveError::OutOfStep {
                rank,
                got: describe(header[0], got),
                expected: describe(op, len.unwrap_or(got.min(MAX_GATHER))),
            });
        }
        Ok(got)
    }

    /// Writes operation `op` with `payload` to `rank`.
    fn send(
        &self,
        stream: &mut TcpStream,
        rank: usize,
        op: u8,
        payload: &[u8],
    ) -> Result<(), CollectiveError> {
        let write = |s: &mut TcpStream| {
            s.write_all(&header(op, payload.len() as u64))?;
            s.write_all(payload)
        };
        write(stream).map_err(|e| self.link_error(rank, e))
    }

    /// Reads one gathered message from `rank`.
    fn receive_gathered(
        &self,
        stream: &mut TcpStream,
        rank: usize,
    ) -> Result<Vec<u8>, CollectiveError> {
        let len = self.expect_header(stream, rank, GATHER, None)?;
        let mut bytes = vec![0u8; len as usize];
        stream
            .read_exact(&mut bytes)
            .map_err(|e| self.link_error(rank, e))?;
        Ok(bytes)
    }
}

fn describe(op: u8, len: u64) -> String {
    match op {
        GATHER if len == MAX_GATHER => format!("a gather of at most {len} bytes"),
        GATHER => format!("a gather of {len} bytes"),
        REDUCE => format!("a sum of {} values", len / 4),
        other => format!("operation {other}"),
    }
}

fn header(op: u8, len: u64) -> [u8; 9] {
    let mut h = [0u8; 9];
    h[0] = op;
    h[1..].copy_from_slice(&len.to_le_bytes());
    h
}

/// Rank 0's side of the rendezvous: the streams of ranks 1.. in rank order.
fn accept_ranks(
    listener: &TcpListener,
    env: &WorldEnv,
    deadline: Instant,
) -> Result<Vec<TcpStream>, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut slots: Vec<Option<TcpStream>> = (1..env.world_size).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..env.world_size)
                        .filter(|r| slots[r - 1].is_none())
                        .map(|r| r.to_string())
                        .collect();
                    return Err(format!(
                        "ranks {} did not connect within {} s",
                        missing.join(", "),
                        env.timeout.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut hello = [0u8; 24];
        if stream.read_exact(&mut hello).is_err() || &hello[..8] != HELLO {
            // Something else connected to the port: not one of ours.
            continue;
        }
        let number =
            |at: usize| u64::from_le_bytes(hello[at..at + 8].try_into().unwrap_or_default());
        let (rank, world) = (number(8) as usize, number(16) as usize);
        if world != env.world_size {
            return Err(format!(
                "rank {rank} has WORLD_SIZE {world} but rank 0 has {}",
                env.world_size
            ));
        }
        let slot = rank
            .checked_sub(1)
            .and_then(|i| slots.get_mut(i))
            .ok_or_else(|| format!("a process connected as rank {rank} of {world}"))?;
        if slot.is_some() {
            return Err(format!("two processes connected as rank {rank}"));
        }
        stream.write_all(HELLO).map_err(|e| e.to_string())?;
        *slot = Some(stream);
    }
    Ok(slots.into_iter().flatten().collect())
}

/// A non-zero rank's side of the rendezvous: connects to rank 0 (retrying until `deadline`)
/// and introduces itself.
fn connect_to_root(address: &str, env: &WorldEnv, deadline: Instant) -> Result<TcpStream, String> {
    let mut stream = loop {
        match TcpStream::connect(address) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!(
                    "rank {} could not reach rank 0 within {} s: {e}",
                    env.rank,
                    env.timeout.as_secs()
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let mut hello = HELLO.to_vec();
    hello.extend((env.rank as u64).to_le_bytes());
    hello.extend((env.world_size as u64).to_le_bytes());
    stream.write_all(&hello).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(env.timeout))
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; 8];
    stream
        .read_exact(&mut answer)
        .map_err(|e| format!("rank 0 did not accept rank {}: {e}", env.rank))?;
    if &answer != HELLO {
        return Err("the process at this address is not llmtool's rank 0".into());
    }
    Ok(stream)
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather(&self, message: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let mut streams = self.streams();
        if self.rank != 0 {
            let stream = &mut streams[0];
            self.send(stream, 0, GATHER, message)?;
            return (0..self.world)
                .map(|_| self.receive_gathered(stream, 0))
                .collect();
        }
        let mut all = vec![message.to_vec()];
        for (i, stream) in streams.iter_mut().enumerate() {
            all.push(self.receive_gathered(stream, i + 1)?);
        }
        for (i, stream) in streams.iter_mut().enumerate() {
            for bytes in &all {
                self.send(stream, i + 1, GATHER, bytes)?;
            }
        }
        Ok(all)
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let len = (values.len() * 4) as u64;
        let mut streams = self.streams();
        if self.rank != 0 {
            let stream = &mut streams[0];
            let mut bytes = encode(values);
            self.send(stream, 0, REDUCE, &bytes)?;
            self.expect_header(stream, 0, REDUCE, Some(len))?;
            stream
                .read_exact(&mut bytes)
                .map_err(|e| self.link_error(0, e))?;
            decode_into(&bytes, values);
            return Ok(());
        }
        let mut piece = vec![0u8; PIECE.min(len as usize)];
        for (i, stream) in streams.iter_mut().enumerate() {
            let rank = i + 1;
            self.expect_header(stream, rank, REDUCE, Some(len))?;
            for chunk in values.chunks_mut(PIECE / 4) {
                let bytes = &mut piece[..chunk.len() * 4];
                stream
                    .read_exact(bytes)
                    .map_err(|e| self.link_error(rank, e))?;
                for (v, b) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v += f32::get(b);
                }
            }
        }
        let sum = encode(values);
        for (i, stream) in streams.iter_mut().enumerate() {
            self.send(stream, i + 1, REDUCE, &sum)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize, port: u16) -> WorldEnv {
        WorldEnv {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            timeout: Duration::from_secs(20),
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn ranks_in_threads_reduce_and_gather_through_sockets() {
        let (world, port) = (3, free_port());
        let results: Vec<(Vec<f32>, Vec<Vec<u8>>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    s.spawn(move || {
                        let c = TcpCollective::connect(&env(rank, world, port)).unwrap();
                        // Larger than one piece, so rank 0 adds in pieces.
                        let n = PIECE / 4 + 3;
                        let mut values: Vec<f32> =
                            (0..n).map(|i| (i % 7) as f32 * 0.1 + rank as f32).collect();
                        c.all_reduce_sum(&mut values).unwrap();
                        let gathered = c.all_gather(&vec![rank as u8; rank + 1]).unwrap();
                        (values, gathered)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (values, gathered) in &results {
            let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
            let first: Vec<u32> = results[0].0.iter().map(|v| v.to_bits()).collect();
            assert_eq!(bits, first, "every rank holds the same bits");
            assert_eq!(gathered, &vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
        }
        let i = 5;
        let expected = (0..world).fold(0.0f32, |acc, r| acc + ((i % 7) as f32 * 0.1 + r as f32));
        assert_eq!(results[1].0[i], expected);
    }

    #[test]
    fn a_rank_that_dies_stops_the_others_with_its_number() {
        let (world, port) = (3, free_port());
        let errors: Vec<Option<String>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    s.spawn(move || {
                        let c = TcpCollective::connect(&env(rank, world, port)).unwrap();
                        if rank == 2 {
                            return None; // dropped: its connection closes
                        }
                        Some(c.all_reduce_sum(&mut [1.0]).unwrap_err().to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors[0]
            .as_deref()
            .unwrap()
            .contains("rank 2 of 3 stopped"));
        // Rank 1 learns it from rank 0 going away.
        assert!(errors[1]
            .as_deref()
            .unwrap()
            .contains("rank 0 of 3 stopped"));
    }

    #[test]
    fn ranks_out_of_step_are_told_so() {
        let (world, port) = (2, free_port());
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    s.spawn(move || {
                        let c = TcpCollective::connect(&env(rank, world, port)).unwrap();
                        let mut values = vec![0.0; rank + 1];
                        match c.all_reduce_sum(&mut values) {
                            Ok(()) => String::new(),
                            Err(e) => e.to_string(),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(errors[0].contains("rank 1 is out of step"), "{errors:?}");
        assert!(errors[1].contains("rank 0 of 2 stopped"), "{errors:?}");
    }

    #[test]
    fn a_rank_without_its_peers_gives_up_after_the_timeout() {
        let mut lonely = env(0, 2, free_port());
        lonely.timeout = Duration::from_millis(200);
        let err = TcpCollective::connect(&lonely).err().unwrap().to_string();
        assert!(err.contains("ranks 1 did not connect within"), "{err}");
    }
}
