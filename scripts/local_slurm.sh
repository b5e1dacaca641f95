#!/usr/bin/env bash
# A SLURM cluster on this machine, for the SLURM tests and for trying the launcher by hand.
#
#   scripts/local_slurm.sh start     # writes the configs, starts MariaDB + slurmdbd + slurmctld + slurmd
#   export SLURM_CONF=$(scripts/local_slurm.sh conf)   # then sinfo, sbatch, squeue, sacct, scancel work
#   scripts/local_slurm.sh status
#   scripts/local_slurm.sh stop      # stops every daemon it started
#   scripts/local_slurm.sh --nodes 2 start|conf|status|stop   # the same, as a cluster of 2 nodes (below)
#
# Real SLURM (Debian's slurm-wlm), not a mock: the same sbatch/srun/scancel, signals, requeue and job
# environment a cluster gives. No munge, cgroups or systemd (auth/none, proctrack/linuxproc, task/none), run as
# root. Accounting is real too (slurmdbd over a private MariaDB): the sweep launcher (submitit) reads job states
# only through `sacct`, and without it cannot tell a job that ended without a result from one still running.
#
# One node (the default): named after `hostname -s`, with this machine's CPUs and memory; everything lives under
# $FLAN_SQUAD_SLURM_DIR (default /tmp/flan-squad-slurm).
#
# --nodes N (2 to 9): N nodes node1..nodeN, each a slurmd in its own network and hostname (UTS) namespace, as
# separate machines would be: its own address on a private bridge (10.213.N.0/24, nothing routed beyond this
# machine) and its own hostname, which the others resolve through a hosts file bind-mounted over /etc/hosts in
# every namespace of the cluster. The controller (MariaDB, slurmdbd, slurmctld) runs in one more namespace, "head",
# so nothing listens outside the bridge, and this cluster shares no port, directory or name with the one-node one.
# The filesystem is shared, as a cluster's shared storage would be. Each node offers this machine's CPUs and an
# N-th of its memory. Everything lives under $FLAN_SQUAD_SLURM_DIR (default /tmp/flan-squad-slurm-Nnodes);
# `stop` ends every daemon and job process in the namespaces, then removes the namespaces, their links and the bridge.
set -euo pipefail

NODES=1
if [[ ${1:-} == --nodes ]]; then
    NODES=${2:-}
    shift 2 || true
fi
[[ $NODES =~ ^[1-9]$ ]] || { echo "error: --nodes $NODES: a whole number from 1 to 9" >&2; exit 2; }

HOST=$(hostname -s)
if ((NODES == 1)); then
    DIR=${FLAN_SQUAD_SLURM_DIR:-/tmp/flan-squad-slurm}
    CLUSTER=flansquad
    CONTROLLER=$HOST
    NODE_NAMES=("$HOST")
else
    DIR=${FLAN_SQUAD_SLURM_DIR:-/tmp/flan-squad-slurm-${NODES}nodes}
    CLUSTER=flansquad${NODES}n
    CONTROLLER=head
    NODE_NAMES=()
    for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("node$i"); done
    SUBNET=10.213.$NODES        # the bridge: .1 this machine's side, .10 head, .11... the nodes
    BRIDGE=flsq${NODES}br
fi
CONF=$DIR/etc/slurm.conf
DB_PORT=${FLAN_SQUAD_SLURM_DB_PORT:-13306}
APT="apt-get update && apt-get install -y slurm-wlm slurmdbd mariadb-server iproute2"

need() {
    local missing=()
    for program in slurmctld slurmd slurmdbd sbatch sacct sacctmgr mariadbd mariadb-install-db; do
        command -v "$program" >/dev/null || missing+=("$program")
    done
    if ((NODES > 1)); then
        for program in ip nsenter unshare mount; do command -v "$program" >/dev/null || missing+=("$program"); done
    fi
    if ((${#missing[@]})); then
        echo "error: SLURM is not installed here (missing: ${missing[*]}); install it with: $APT" >&2
        exit 2
    fi
    [[ $(id -u) == 0 ]] || { echo "error: the local cluster runs its daemons as root: run this as root" >&2; exit 2; }
}

# --- where each daemon runs: this machine (one node), or a namespace of the cluster (--nodes N) ----------------

namespace() { echo "flan-squad-${NODES}n-$1"; }  # the network namespace of node (or head) $1

address() {  # the address of node (or head) $1 on the bridge
    if [[ $1 == head ]]; then echo "$SUBNET.10"; else echo "$SUBNET.$((10 + ${1#node}))"; fi
}

on() {  # on NAME COMMAND...: run COMMAND on node (or head) NAME: in its namespaces, under its hostname
    local name=$1
    shift
    if ((NODES == 1)); then
        "$@"
        return
    fi
    # A mount namespace of its own (a slave of this one's: the filesystem stays shared) for the hosts file alone.
    # Not `ip netns exec`, which also mounts a /sys without /sys/fs/cgroup, where slurmd fails to start.
    nsenter --net="/run/netns/$(namespace "$name")" unshare --uts --mount --propagation slave -- \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$DIR/etc/hosts" "$name" "$@"
}

create_network() {
    if ip -o -4 addr show | grep -q " $SUBNET\."; then
        ip link show "$BRIDGE" >/dev/null 2>&1 || {
            echo "error: $SUBNET.0/24 is already in use on this machine (ip -4 addr): the $NODES-node cluster needs it" >&2
            exit 2
        }
    fi
    {
        echo "127.0.0.1 localhost"
        for name in head "${NODE_NAMES[@]}"; do echo "$(address "$name") $name"; done
    } >"$DIR/etc/hosts"
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local name ns link
    for name in head "${NODE_NAMES[@]}"; do
        ns=$(namespace "$name") link=flsq${NODES}-${name#node}
        ip netns list | grep -qw "$ns" && continue
        if ! ip netns add "$ns" 2>"$DIR/log/netns.log"; then
            echo "error: cannot create network namespace $ns ($(cat "$DIR/log/netns.log")): the $NODES-node" \
                "cluster needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN (a VM, or a privileged container)" >&2
            exit 2
        fi
        ip link add "$link" type veth peer name eth0 netns "$ns"
        ip link set "$link" master "$BRIDGE" up
        ip -n "$ns" addr add "$(address "$name")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

remove_network() {
    local name ns pids
    for name in head "${NODE_NAMES[@]}"; do
        ns=$(namespace "$name")
        ip netns list | grep -qw "$ns" || continue
        # What is left in it: job steps (slurmstepd and its tasks) of a node whose slurmd has stopped.
        pids=$(ip netns pids "$ns")
        [[ -z $pids ]] || { kill $pids 2>/dev/null || true; sleep 1; kill -9 $(ip netns pids "$ns") 2>/dev/null || true; }
        ip netns del "$ns"  # and the veth pair with it
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    # The kernel removes a namespace's links a moment after `ip netns del`: gone before a new start makes them.
    for ((i = 0; i < 40; i++)); do ip -o link show | grep -q " flsq$NODES-" || break; sleep 0.25; done
}

# --- configs ------------------------------------------------------------------------------------------------

write_configs() {
    mkdir -p "$DIR"/{etc,state,spool,log,run,db}
    local cpus memory controller=$CONTROLLER dbd_host=$CONTROLLER node_lines="" name
    cpus=$(nproc)
    memory=$(($(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p') / NODES))
    if ((NODES == 1)); then
        node_lines="NodeName=$HOST CPUs=$cpus RealMemory=$memory State=UNKNOWN"
    else
        controller="head($(address head))" dbd_host=$(address head)
        for name in "${NODE_NAMES[@]}"; do
            node_lines+="NodeName=$name NodeAddr=$(address "$name") CPUs=$cpus RealMemory=$memory State=UNKNOWN"$'\n'
        done
    fi
    local per_node=""  # several slurmds share this filesystem: one pid file, log and spool dir each (%n: node name)
    ((NODES == 1)) || per_node=-%n
    cat >"$CONF" <<CONFIG
ClusterName=$CLUSTER
SlurmctldHost=$controller
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A job that asks for no memory gets 1 GB per CPU, not the whole node.
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$dbd_host
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool$per_node
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd$per_node.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd$per_node.log
ReturnToService=2
KillWait=30
MinJobAge=600
$node_lines
PartitionName=local Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP
CONFIG
    cat >"$DIR/etc/slurmdbd.conf" <<CONFIG
AuthType=auth/none
DbdHost=$CONTROLLER
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONFIG
    chmod 600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a config others can read
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for ((i = 0; i < seconds * 4; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "error: $what did not come up within ${seconds}s; logs in $DIR/log" >&2
    return 1
}

running() {  # running NAME: whether the daemon of pid file $DIR/run/NAME.pid is alive
    [[ -f $DIR/run/$1.pid ]] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null
}

start_database() {
    running mariadb && return
    if [[ ! -d $DIR/db/mysql ]]; then
        mariadb-install-db --user=root --datadir="$DIR/db" --auth-root-authentication-method=socket \
            >"$DIR/log/mariadb-install.log" 2>&1
    fi
    on "$CONTROLLER" mariadbd --user=root --datadir="$DIR/db" --socket="$DIR/run/mysql.sock" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
        --skip-log-bin &>/dev/null &
    # The socket is a file: reachable from this namespace too.
    wait_for 60 MariaDB mariadb --socket="$DIR/run/mysql.sock" -e "select 1"
    mariadb --socket="$DIR/run/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start() {
    need
    if running slurmctld; then
        echo "the local cluster is already running (SLURM_CONF=$CONF)"
        return
    fi
    local name
    write_configs
    export SLURM_CONF=$CONF
    if ((NODES > 1)); then
        create_network
        for name in "${NODE_NAMES[@]}"; do mkdir -p "$DIR/spool-$name"; done
    fi
    start_database
    on "$CONTROLLER" slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -i show cluster
    sacctmgr -i -n -P show cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    on "$CONTROLLER" slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    for name in "${NODE_NAMES[@]}"; do
        on "$name" slurmd -f "$CONF"  # finds its node by its hostname, as on a cluster
    done
    # A node is idle once its slurmd has registered (mixed/allocated later; down/drained would be a fault).
    if ! wait_for 60 "${#NODE_NAMES[@]} node(s)" bash -c "[[ \$(sinfo -h -N -o %t | grep -cx idle) == ${#NODE_NAMES[@]} ]]"
    then
        sinfo -N -l >&2 || true
        exit 1
    fi
    sinfo
    echo "local cluster up: export SLURM_CONF=$CONF"
}

stop() {
    local name pid
    for name in slurmd "${NODE_NAMES[@]/#/slurmd-}" slurmctld slurmdbd mariadb; do
        [[ -f $DIR/run/$name.pid ]] || continue
        pid=$(cat "$DIR/run/$name.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for ((i = 0; i < 80; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$DIR/run/$name.pid"
    done
    # A MariaDB whose pid file is gone (e.g. a start interrupted early) still answers on its socket.
    if [[ -S $DIR/run/mysql.sock ]]; then
        mariadb-admin --socket="$DIR/run/mysql.sock" shutdown 2>/dev/null || true
    fi
    ((NODES == 1)) || remove_network
    echo "local cluster stopped"
}

status() {
    export SLURM_CONF=$CONF
    sinfo && squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    conf) echo "$CONF" ;;
    check) need ;;
    *) echo "usage: $0 [--nodes N] start|stop|status|conf|check" >&2; exit 2 ;;
esac
