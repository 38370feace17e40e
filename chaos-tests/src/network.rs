//! Each node in a network namespace of its own, so that a partition cuts a real network path.
//!
//! The servers (etcd, the store) listen on a bridge's address in the host's namespace; each node
//! has a namespace joined to the bridge by a veth pair, with an address of its own that its
//! workers listen on. Cutting a node's veth (link down) partitions it from everyone; a queueing
//! discipline on both ends of it slows its traffic (netem's delay and loss where the kernel has
//! it, else a token bucket's rate limit, which delays and drops as its queue fills). Needs root
//! (CAP_NET_ADMIN) and `ip` and `tc` from iproute2. Everything it made is removed when dropped.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

#[derive(Debug)]
pub struct Network {
    tag: String,
    /// The /24 subnet's first three octets.
    subnet: String,
    nodes: usize,
    made: Vec<Vec<String>>,
}

/// Runs `command` with `args` to the end; its error output when it fails.
fn exec(mut command: Command, args: &[&str]) -> Result<()> {
    let name = command.get_program().to_string_lossy().into_owned();
    let out = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {name} (iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{name} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    exec(Command::new("ip"), args)
}

impl Network {
    /// A bridge and `nodes` namespaces, named and numbered from `key` (unique per scenario in
    /// flight on this machine).
    pub fn setup(key: u64, nodes: usize) -> Result<Network> {
        let x = key % 0x4000;
        let mut n = Network {
            tag: format!("mc{x:04x}"),
            subnet: format!("10.{}.{}", 128 + (x >> 8), x & 0xff),
            nodes,
            made: Vec::new(),
        };
        let bridge = n.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        n.made
            .push(vec!["link".into(), "del".into(), bridge.clone()]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", n.server_ip()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..nodes {
            let (ns, veth) = (n.namespace(i), n.veth(i));
            ip(&["netns", "add", &ns])?;
            n.made.push(vec!["netns".into(), "del".into(), ns.clone()]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            let addr = format!("{}/24", n.node_ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.tag)
    }

    pub fn namespace(&self, i: usize) -> String {
        format!("{}-n{i}", self.tag)
    }

    /// The servers' address, on the bridge.
    pub fn server_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Node `i`'s address, in its namespace.
    pub fn node_ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Cuts node `i` off: its link goes down.
    pub fn partition(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.veth(i), "down"])
    }

    pub fn heal(&self, i: usize) -> Result<()> {
        ip(&["link", "set", &self.veth(i), "up"])
    }

    /// Slows node `i`'s traffic both ways; says how.
    pub fn slow(&self, i: usize) -> Result<String> {
        let ns = self.namespace(i);
        let veth = self.veth(i);
        let netem = ["root", "netem", "delay", "40ms", "10ms", "loss", "2%"];
        let tbf = [
            "root", "tbf", "rate", "4mbit", "burst", "32kbit", "latency", "100ms",
        ];
        for (how, q) in [
            ("netem: 40 ms delay, 2% loss", &netem[..]),
            ("tbf: 4 Mbit/s, 100 ms of queue", &tbf[..]),
        ] {
            let host = tc(None, &[&["qdisc", "add", "dev", &veth], q].concat());
            if host.is_err() {
                continue;
            }
            tc(Some(&ns), &[&["qdisc", "add", "dev", "eth0"], q].concat())?;
            return Ok(how.into());
        }
        bail!("neither netem nor tbf is available to tc")
    }

    pub fn unslow(&self, i: usize) -> Result<()> {
        tc(None, &["qdisc", "del", "dev", &self.veth(i), "root"])?;
        tc(
            Some(&self.namespace(i)),
            &["qdisc", "del", "dev", "eth0", "root"],
        )
    }
}

/// `tc` in the host's namespace, or in `ns`.
fn tc(ns: Option<&str>, args: &[&str]) -> Result<()> {
    match ns {
        Some(ns) => exec(
            Command::new("ip"),
            &[&["netns", "exec", ns, "tc"], args].concat(),
        ),
        None => exec(Command::new("tc"), args),
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for undo in self.made.iter().rev() {
            let args: Vec<&str> = undo.iter().map(String::as_str).collect();
            let _ = ip(&args);
        }
    }
}
