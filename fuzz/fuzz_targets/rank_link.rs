//! The link between ranks of a multi-process run (`train --gpus N` on the CPU, several
//! machines): `train::distributed::tcp::TcpCollective` reading what another rank sent. The
//! first byte picks the side: rank 0 with a rank 1 that introduced itself properly and then
//! sends the rest of the input, or rank 1 with a rank 0 whose every byte (its welcome included)
//! is the rest of the input. The real rank then runs a gather, a sum and a gather, as a
//! training step's exchanges do; each must give its result or a `CollectiveError`, without a
//! panic, a hang or an allocation beyond the protocol's caps. The fake peer closes its side
//! after the input, so a short input ends in a lost peer, never in a wait.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::Duration;
use train::distributed::env::WorldEnv;
use train::distributed::tcp::{TcpCollective, HELLO};
use train::distributed::Collective;

fn world(rank: usize, port: u16) -> WorldEnv {
    WorldEnv {
        rank,
        world_size: 2,
        local_rank: rank,
        local_world_size: 2,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_secs(5),
    }
}

/// A step's exchanges; every outcome but a panic is fine.
fn exchange(collective: &TcpCollective) {
    let _ = collective.all_gather(b"a config and its fingerprint");
    let _ = collective.all_reduce_sum(&mut [1.0, -2.5, 3.25]);
    let _ = collective.all_gather(&[]);
}

/// Sends `input` on `peer`, closes the sending side, then reads until the real rank closes.
fn play(mut peer: TcpStream, input: &[u8]) {
    let _ = peer.write_all(input);
    let _ = peer.shutdown(Shutdown::Write);
    let _ = peer.read_to_end(&mut Vec::new());
}

/// Rank 0, with a fake rank 1 that says hello as a rank does and then sends `input`.
fn as_rank_zero(input: &[u8]) {
    let Ok(port) = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) else {
        return;
    };
    let rank_zero = std::thread::spawn(move || {
        if let Ok(collective) = TcpCollective::connect(&world(0, port.port())) {
            exchange(&collective);
        }
    });
    let peer = (0..200).find_map(|_| {
        TcpStream::connect(port)
            .map_err(|_| std::thread::sleep(Duration::from_millis(5)))
            .ok()
    });
    if let Some(mut peer) = peer {
        let mut hello = HELLO.to_vec();
        hello.extend(1u64.to_le_bytes());
        hello.extend(2u64.to_le_bytes());
        let mut welcome = [0u8; 8];
        if peer.write_all(&hello).is_ok() && peer.read_exact(&mut welcome).is_ok() {
            play(peer, input);
        }
    }
    rank_zero.join().expect("rank 0 panicked");
}

/// Rank 1, connected to a fake rank 0 whose bytes are all `input`.
fn as_rank_one(input: &[u8]) {
    let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
        return;
    };
    let Ok(address) = listener.local_addr() else {
        return;
    };
    let rank_one = std::thread::spawn(move || {
        if let Ok(collective) = TcpCollective::connect(&world(1, address.port())) {
            exchange(&collective);
        }
    });
    if let Ok((mut peer, _)) = listener.accept() {
        let mut hello = [0u8; 24];
        if peer.read_exact(&mut hello).is_ok() {
            play(peer, input);
        }
    }
    rank_one.join().expect("rank 1 panicked");
}

fuzz_target!(|bytes: &[u8]| {
    match bytes.split_first() {
        Some((side, input)) if side % 2 == 0 => as_rank_zero(input),
        Some((_, input)) => as_rank_one(input),
        None => {}
    }
});
