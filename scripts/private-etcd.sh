# Sourced by the scripts that need etcd: `start_private_etcd ETCD` starts the etcd binary ETCD
# as a one-member cluster on free loopback ports, its data and log in the current folder, and
# sets `etcd_url` (its client URL) and `etcd_pid` (for the caller's cleanup to kill).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
start_private_etcd() {
    local client peer
    client="$(free_port)" peer="$(free_port)"
    "$1" --data-dir etcd --listen-client-urls "http://127.0.0.1:$client" \
        --advertise-client-urls "http://127.0.0.1:$client" --listen-peer-urls "http://127.0.0.1:$peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "default=http://127.0.0.1:$peer" >etcd.log 2>&1 &
    etcd_pid=$!
    # Not the shell's job: no "Killed" line when the cleanup kills it.
    disown
    etcd_url="http://127.0.0.1:$client"
}
