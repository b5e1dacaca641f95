#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the SLURM tests and for trying the launcher by hand.
#
#   scripts/local_slurm.sh start     # writes the configs, starts MariaDB + slurmdbd + slurmctld + slurmd
#   export SLURM_CONF=$(scripts/local_slurm.sh conf)   # then sinfo, sbatch, squeue, sacct, scancel work
#   scripts/local_slurm.sh status
#   scripts/local_slurm.sh stop      # stops every daemon it started
#
# Real SLURM (Debian's slurm-wlm), not a mock: the same sbatch/srun/scancel, signals, requeue and job
# environment a cluster gives. One node named after `hostname -s`, with this machine's CPUs and memory;
# no munge, cgroups or systemd (auth/none, proctrack/linuxproc, task/none), run as root. Accounting is real
# too (slurmdbd over a private MariaDB): the sweep launcher (submitit) reads job states only through `sacct`,
# and without accounting it cannot tell a job that ended without a result from one still running.
# Everything lives under $FLAN_SQUAD_SLURM_DIR (default /tmp/flan-squad-slurm).
set -euo pipefail

DIR=${FLAN_SQUAD_SLURM_DIR:-/tmp/flan-squad-slurm}
CONF=$DIR/etc/slurm.conf
HOST=$(hostname -s)
DB_PORT=${FLAN_SQUAD_SLURM_DB_PORT:-13306}
APT="apt-get update && apt-get install -y slurm-wlm slurmdbd mariadb-server"

need() {
    local missing=()
    for program in slurmctld slurmd slurmdbd sbatch sacct sacctmgr mariadbd mariadb-install-db; do
        command -v "$program" >/dev/null || missing+=("$program")
    done
    if ((${#missing[@]})); then
        echo "error: SLURM is not installed here (missing: ${missing[*]}); install it with: $APT" >&2
        exit 2
    fi
    [[ $(id -u) == 0 ]] || { echo "error: the local cluster runs its daemons as root: run this as root" >&2; exit 2; }
}

write_configs() {
    mkdir -p "$DIR"/{etc,state,spool,log,run,db}
    local cpus memory
    cpus=$(nproc)
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    cat >"$CONF" <<EOF
ClusterName=flansquad
SlurmctldHost=$HOST
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
AccountingStorageHost=$HOST
JobCompType=jobcomp/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName=$HOST CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/none
DbdHost=$HOST
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
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

start_database() {
    if [[ -f $DIR/run/mariadb.pid ]] && kill -0 "$(cat "$DIR/run/mariadb.pid")" 2>/dev/null; then
        return
    fi
    if [[ ! -d $DIR/db/mysql ]]; then
        mariadb-install-db --user=root --datadir="$DIR/db" --auth-root-authentication-method=socket \
            >"$DIR/log/mariadb-install.log" 2>&1
    fi
    mariadbd --user=root --datadir="$DIR/db" --socket="$DIR/run/mysql.sock" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" --log-error="$DIR/log/mariadb.log" \
        --skip-log-bin &>/dev/null &
    wait_for 60 MariaDB mariadb --socket="$DIR/run/mysql.sock" -e "select 1"
    mariadb --socket="$DIR/run/mysql.sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start() {
    need
    if [[ -f $DIR/run/slurmctld.pid ]] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
        echo "the local cluster is already running (SLURM_CONF=$CONF)"
        return
    fi
    write_configs
    export SLURM_CONF=$CONF
    start_database
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 30 slurmdbd sacctmgr -i show cluster
    sacctmgr -i show cluster format=cluster -n | grep -qw flansquad || sacctmgr -i add cluster flansquad >/dev/null
    slurmctld -f "$CONF"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$CONF"
    # The node is idle once slurmd has registered (mixed/allocated later; down/drained would be a fault).
    if ! wait_for 60 "node $HOST" bash -c "sinfo -h -N -o %t | grep -qx idle"; then
        sinfo -N -l >&2 || true
        exit 1
    fi
    sinfo
    echo "local cluster up: export SLURM_CONF=$CONF"
}

stop() {
    local name pid
    for name in slurmd slurmctld slurmdbd mariadb; do
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
    *) echo "usage: $0 start|stop|status|conf|check" >&2; exit 2 ;;
esac
