//! Proving membership of a process group when a connection is made.
//!
//! The connecting member (rank `c`) and the listening one (rank `l`) each show that they hold
//! the generation's group secret: an HMAC-SHA256, keyed by the secret, over the group's identity
//! (job, generation, group), both ranks, their roles and a fresh nonce from each side.
//!
//! 1. connector: `MRT2`, `c` (u32, little-endian), its nonce (16 bytes);
//! 2. listener: its nonce, its proof (32 bytes) — only for a `c` above `l` and in the group;
//! 3. connector: checks the listener's proof, then sends its own (32 bytes).
//!
//! The secret never crosses the wire, a greeting recorded earlier is of no use (the other
//! side's nonce is fresh), and a member of another job, generation or group, or one without the
//! secret, is refused by both sides. Tensors that follow travel unencrypted.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"MRT2";
const NONCE_BYTES: usize = 16;
const MAC_BYTES: usize = 32;
const HELLO_BYTES: usize = 4 + 4 + NONCE_BYTES;
/// How often a wait for the other side asks whether it should give up.
const SLICE: Duration = Duration::from_millis(100);

/// Who the members of one group are: what each proof covers.
#[derive(Debug, Clone)]
pub struct Identity {
    pub job: String,
    pub generation: u64,
    pub group: String,
    pub secret: Vec<u8>,
}

impl Identity {
    /// The proof that the side `role` of rank `from`, talking to rank `to`, holds the secret.
    fn proof(&self, role: &[u8], from: usize, to: usize, nonces: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        for part in [
            b"marathon process group\0".as_slice(),
            role,
            self.job.as_bytes(),
            b"\0",
            &self.generation.to_le_bytes(),
            self.group.as_bytes(),
            b"\0",
            &(from as u64).to_le_bytes(),
            &(to as u64).to_le_bytes(),
            nonces,
        ] {
            mac.update(part);
        }
        mac
    }
}

/// The connecting side, rank `me`, greeting rank `peer`: returns once both have proved
/// themselves, or says why not. `check` is asked while it waits for the answer (the listener
/// may still be connecting to its own lower ranks), so an aborted rendezvous ends it.
pub fn greet(
    stream: &mut TcpStream,
    id: &Identity,
    me: usize,
    peer: usize,
    deadline: Instant,
    check: &dyn Fn() -> crate::error::Result<()>,
) -> crate::error::Result<std::result::Result<(), String>> {
    let mine = nonce();
    let mut hello = Vec::with_capacity(HELLO_BYTES);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(me as u32).to_le_bytes());
    hello.extend_from_slice(&mine);
    if let Err(e) = stream.write_all(&hello) {
        return Ok(Err(format!("greeting: {e}")));
    }
    let mut answer = [0u8; NONCE_BYTES + MAC_BYTES];
    if let Err(e) = read_until(stream, &mut answer, deadline, check)? {
        return Ok(Err(format!("waiting for its proof: {e}")));
    }
    let nonces = [mine.as_slice(), &answer[..NONCE_BYTES]].concat();
    if id
        .proof(b"listener", peer, me, &nonces)
        .verify_slice(&answer[NONCE_BYTES..])
        .is_err()
    {
        return Ok(Err(
            "it did not prove that it holds this generation's group secret (a process of \
             another job or generation, or an impostor)"
                .into(),
        ));
    }
    let proof = id
        .proof(b"connector", me, peer, &nonces)
        .finalize()
        .into_bytes();
    Ok(stream
        .write_all(&proof)
        .map_err(|e| format!("sending its proof: {e}")))
}

/// The listening side, rank `me` of `size`: reads a greeting before `deadline`, answers it,
/// and checks the connector's proof. Returns the connector's rank, or why it was refused.
pub fn answer(
    stream: &mut TcpStream,
    id: &Identity,
    me: usize,
    size: usize,
    deadline: Instant,
) -> std::result::Result<usize, String> {
    let no_check = || Ok(());
    let mut hello = [0u8; HELLO_BYTES];
    read_until(stream, &mut hello, deadline, &no_check)
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("no greeting: {e}"))?;
    if &hello[..4] != MAGIC {
        return Err("it does not speak marathon's group protocol".into());
    }
    let peer = u32::from_le_bytes(hello[4..8].try_into().expect("4 bytes")) as usize;
    if peer <= me || peer >= size {
        return Err(format!(
            "it claims rank {peer}, which does not connect to rank {me} in a group of {size}"
        ));
    }
    let theirs = &hello[8..];
    let mine = nonce();
    let nonces = [theirs, mine.as_slice()].concat();
    let proof = id
        .proof(b"listener", me, peer, &nonces)
        .finalize()
        .into_bytes();
    stream
        .write_all(&[mine.as_slice(), &proof].concat())
        .map_err(|e| format!("answering rank {peer}: {e}"))?;
    let mut theirs = [0u8; MAC_BYTES];
    read_until(stream, &mut theirs, deadline, &no_check)
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("it claims rank {peer} but gave no proof of the group secret: {e}"))?;
    id.proof(b"connector", peer, me, &nonces)
        .verify_slice(&theirs)
        .map_err(|_| {
            format!(
                "it claims rank {peer} but did not prove that it holds this generation's group \
                 secret"
            )
        })?;
    Ok(peer)
}

/// Fills `buf` from `stream` before `deadline`, asking `check` between waits. The outer error
/// is `check`'s; the inner one says why the bytes did not come.
fn read_until(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    check: &dyn Fn() -> crate::error::Result<()>,
) -> crate::error::Result<std::result::Result<(), String>> {
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Err("timed out".into()));
        }
        if let Err(e) = stream.set_read_timeout(Some(left.min(SLICE))) {
            return Ok(Err(e.to_string()));
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) => return Ok(Err("it closed the connection".into())),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => check()?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Ok(Err(e.to_string())),
        }
    }
    Ok(Ok(()))
}

fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).expect("the operating system's random source");
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(listener: Identity, connector: Identity, rank: usize) -> (String, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            format!("{:?}", answer(&mut s, &listener, 0, 4, deadline))
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let c = greet(&mut s, &connector, rank, 0, deadline, &|| Ok(())).unwrap();
        (format!("{c:?}"), server.join().unwrap())
    }

    fn id(generation: u64, secret: &[u8]) -> Identity {
        Identity {
            job: "j".into(),
            generation,
            group: "dp-0".into(),
            secret: secret.to_vec(),
        }
    }

    #[test]
    fn members_with_the_secret_prove_it_and_others_are_refused_by_both_sides() {
        assert_eq!(
            pair(id(3, b"s"), id(3, b"s"), 2),
            ("Ok(())".into(), "Ok(2)".into())
        );
        for (other, rank) in [(id(3, b"t"), 2), (id(2, b"s"), 2), (id(3, b""), 1)] {
            let (c, l) = pair(id(3, b"s"), other, rank);
            assert!(c.contains("did not prove"), "{c}");
            assert!(l.starts_with("Err("), "{l}");
        }
        let (_, l) = pair(id(3, b"s"), id(3, b"s"), 7);
        assert!(l.contains("claims rank 7"), "{l}");
    }
}
