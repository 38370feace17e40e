//! Choosing a group's transport at rendezvous, over its fresh TCP connections: who asks for
//! what, rank 0's choice, and the segment's name handed from rank 0 to the others.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::segment::{create_segment, open_segment};
use super::Shm;

/// The longest message of the negotiation at rendezvous.
const MESSAGE_BYTES_MAX: usize = 4096;

/// What one member tells rank 0 at rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ask {
    /// Shared memory, if everyone is on this host (its identity).
    Auto(String),
    /// TCP, and why.
    Tcp(String),
}

/// This host as its processes see it: the boot (which two machines never share), the host
/// name, and this process's network and mount namespaces (a node of the chaos suite's network,
/// or a container, is another host to its peers) and user. Empty where the boot id cannot be
/// read, which makes no match.
pub(crate) fn host_identity() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let link = |p: &str| {
        std::fs::read_link(p)
            .map(|l| l.display().to_string())
            .unwrap_or_default()
    };
    let boot = read("/proc/sys/kernel/random/boot_id");
    if boot.is_empty() {
        return String::new();
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    format!(
        "boot {boot} host {} {} {} uid {uid}",
        read("/proc/sys/kernel/hostname"),
        link("/proc/self/ns/net"),
        link("/proc/self/ns/mnt")
    )
}

/// Rank 0's choice from what every member asked (in rank order, its own first): shared
/// memory (None) or TCP and why.
fn choose(asks: &[Ask]) -> Option<String> {
    for (r, ask) in asks.iter().enumerate() {
        if let Ask::Tcp(why) = ask {
            return Some(format!("rank {r} asks for it: {why}"));
        }
    }
    let Some(Ask::Auto(here)) = asks.first() else {
        return Some("a group of one".into());
    };
    if here.is_empty() {
        return Some("this host has no boot id to compare".into());
    }
    asks.iter().enumerate().find_map(|(r, ask)| match ask {
        Ask::Auto(there) if there == here => None,
        _ => Some(format!("rank {r} is on another host or namespace")),
    })
}

/// The outcome of the negotiation: the segment, or TCP; and why, for the log.
pub(crate) struct Chosen {
    pub shm: Option<Shm>,
    pub why: String,
}

/// Chooses the group's transport over its fresh TCP connections, before `deadline`: every
/// member calls it with its `ask`. Errors say which rank failed to answer and how.
pub(crate) fn negotiate(
    peers: &mut [Option<TcpStream>],
    rank: usize,
    ask: Ask,
    deadline: Instant,
) -> Result<Chosen, String> {
    let size = peers.len();
    assert!(size >= 2);
    let talk =
        |e: std::io::Error, peer: usize| format!("transport negotiation with rank {peer}: {e}");
    if rank != 0 {
        let zero = peers[0].as_mut().expect("connected to rank 0");
        let text = match &ask {
            Ask::Auto(id) => format!("auto {id}"),
            Ask::Tcp(why) => format!("tcp {why}"),
        };
        send_message(zero, &text, deadline).map_err(|e| talk(e, 0))?;
        let answer = recv_message(zero, deadline).map_err(|e| talk(e, 0))?;
        let Some(path) = answer.strip_prefix("map ") else {
            let why = answer.strip_prefix("tcp ").unwrap_or(&answer);
            return Ok(Chosen {
                shm: None,
                why: why.into(),
            });
        };
        let mapped = open_segment(Path::new(path), size);
        let reply = match &mapped {
            Ok(_) => "mapped".to_string(),
            Err(e) => format!("failed {e}"),
        };
        send_message(zero, &reply, deadline).map_err(|e| talk(e, 0))?;
        let outcome = recv_message(zero, deadline).map_err(|e| talk(e, 0))?;
        return Ok(match (outcome.strip_prefix("tcp "), mapped) {
            (None, Ok(seg)) if outcome == "shm" => Chosen {
                shm: Some(Shm::new(seg, rank)),
                why: "every member on this host".into(),
            },
            (why, _) => Chosen {
                shm: None,
                why: why.unwrap_or(&outcome).into(),
            },
        });
    }
    let mut asks = vec![ask];
    for (peer, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("connected to every higher rank");
        let text = recv_message(s, deadline).map_err(|e| talk(e, peer))?;
        asks.push(match text.split_once(' ') {
            Some(("auto", id)) => Ask::Auto(id.into()),
            Some(("tcp", why)) => Ask::Tcp(why.into()),
            _ => {
                return Err(format!(
                    "rank {peer} asked for an unknown transport: {text:?}"
                ))
            }
        });
    }
    let created = match choose(&asks) {
        Some(why) => Err(why),
        None => create_segment(size).map_err(|e| format!("no shared memory segment: {e}")),
    };
    let (seg, unlink) = match created {
        Ok(made) => made,
        Err(why) => {
            for (peer, s) in peers.iter_mut().enumerate().skip(1) {
                let s = s.as_mut().expect("connected");
                send_message(s, &format!("tcp {why}"), deadline).map_err(|e| talk(e, peer))?;
            }
            return Ok(Chosen { shm: None, why });
        }
    };
    let name = format!("map {}", unlink.0.display());
    for (peer, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("connected");
        send_message(s, &name, deadline).map_err(|e| talk(e, peer))?;
    }
    let mut refusal = None;
    for (peer, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("connected");
        let reply = recv_message(s, deadline).map_err(|e| talk(e, peer))?;
        if refusal.is_none() && reply != "mapped" {
            let why = reply.strip_prefix("failed ").unwrap_or(&reply);
            refusal = Some(format!("rank {peer} could not map the segment: {why}"));
        }
    }
    // Everyone who will use it has it mapped: its name can go, and with it any trace once the
    // last member is gone.
    drop(unlink);
    let outcome = match &refusal {
        None => "shm".to_string(),
        Some(why) => format!("tcp {why}"),
    };
    for (peer, s) in peers.iter_mut().enumerate().skip(1) {
        let s = s.as_mut().expect("connected");
        send_message(s, &outcome, deadline).map_err(|e| talk(e, peer))?;
    }
    Ok(match refusal {
        None => Chosen {
            shm: Some(Shm::new(seg, 0)),
            why: "every member on this host".into(),
        },
        Some(why) => Chosen { shm: None, why },
    })
}

fn send_message(s: &mut TcpStream, text: &str, deadline: Instant) -> std::io::Result<()> {
    // A reason quoting an error from the system could be long; its start says enough.
    let mut end = text.len().min(MESSAGE_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text[..end];
    s.set_write_timeout(Some(remaining(deadline)?))?;
    let mut bytes = (text.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    s.write_all(&bytes)
}

fn recv_message(s: &mut TcpStream, deadline: Instant) -> std::io::Result<String> {
    let mut len = [0u8; 4];
    read_until(s, &mut len, deadline)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MESSAGE_BYTES_MAX {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a message of {len} bytes"),
        ));
    }
    let mut text = vec![0u8; len];
    read_until(s, &mut text, deadline)?;
    String::from_utf8(text).map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))
}

fn read_until(s: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        s.set_read_timeout(Some(remaining(deadline)?))?;
        match s.read(buf) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut std::mem::take(&mut buf)[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Time left before `deadline`, or a timeout error once it has passed.
fn remaining(deadline: Instant) -> std::io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        return Err(ErrorKind::TimedOut.into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_shares_memory_and_any_other_answer_is_tcp_named() {
        let here = Ask::Auto("boot a host h".into());
        assert_eq!(choose(&[here.clone(), here.clone(), here.clone()]), None);
        let why = choose(&[
            here.clone(),
            here.clone(),
            Ask::Auto("boot b host h".into()),
        ]);
        assert_eq!(
            why.as_deref(),
            Some("rank 2 is on another host or namespace")
        );
        let why = choose(&[here.clone(), Ask::Tcp("MARATHON_COMM_TRANSPORT=tcp".into())]);
        assert_eq!(
            why.as_deref(),
            Some("rank 1 asks for it: MARATHON_COMM_TRANSPORT=tcp")
        );
        let nowhere = Ask::Auto(String::new());
        assert!(choose(&[nowhere.clone(), nowhere]).is_some());
    }

    #[test]
    fn this_host_has_an_identity() {
        let id = host_identity();
        assert!(id.starts_with("boot ") && id.contains(" uid "), "{id}");
        assert_eq!(id, host_identity());
    }
}
