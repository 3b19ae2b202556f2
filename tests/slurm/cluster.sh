#!/usr/bin/env bash
# A single-node SLURM from Debian's packages, started by hand (no systemd), for tests/test_slurm.py.
#
#   tests/slurm/cluster.sh install        the packages (root, apt-get)
#   tests/slurm/cluster.sh start STATE    munge, MariaDB, slurmdbd, slurmctld, slurmd; every file
#                                         in STATE, PIDs in STATE/pids; prints the slurm.conf path
#   tests/slurm/cluster.sh stop STATE     stops every daemon it started, by PID, and puts back
#                                         any /etc/slurm files it had set aside
#
# The configuration goes where every SLURM command looks for it, /etc/slurm (a job's own srun
# does not see the submitter's SLURM_CONF: slurmd sets its own); files already there are moved
# to STATE first. Logs, spool and database live in STATE. The node is this host (its real name,
# its CPUs, a little less than its memory); no cgroups (proctrack/linuxproc, task/none).
set -euo pipefail
cmd="${1:?usage: cluster.sh install|start STATE|stop STATE}"
PACKAGES="slurm-wlm slurmdbd munge mariadb-server"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
  local limit="$1" what="$2"; shift 2
  for _ in $(seq "$((limit * 4))"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "cluster.sh: $what did not come up in ${limit}s" >&2
  return 1
}

case "$cmd" in
install)
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES
  ;;
start)
  state="$(mkdir -p "${2:?STATE}" && cd "$2" && pwd)"
  chmod 755 "$state"  # MariaDB runs as mysql and keeps its data here
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem="$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))"
  : > "$state/pids"

  # munge: the key the package made (or a new one), the daemon as its own user.
  install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 755 /run/munge
  [ -s /etc/munge/munge.key ] || mungekey --create --force
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=/run/munge/munged.pid"
  wait_for 10 munged test -s /run/munge/munged.pid
  echo "munged $(cat /run/munge/munged.pid)" >> "$state/pids"

  # MariaDB for slurmdbd, its data in STATE, on the default socket.
  install -d -o mysql -g mysql "$state/mysql" /run/mysqld
  mariadb-install-db --user=mysql --datadir="$state/mysql" --skip-test-db >"$state/mariadb-install.log" 2>&1 \
    || { echo "cluster.sh: mariadb-install-db failed: $(tail -3 "$state/mariadb-install.log")" >&2; exit 1; }
  mariadbd --user=mysql --datadir="$state/mysql" --socket=/run/mysqld/mysqld.sock \
    --skip-networking --pid-file=/run/mysqld/fusedqk.pid >"$state/mariadb.log" 2>&1 &
  wait_for 30 MariaDB mariadb --socket=/run/mysqld/mysqld.sock -e "select 1"
  echo "mariadbd $(cat /run/mysqld/fusedqk.pid)" >> "$state/pids"
  mariadb --socket=/run/mysqld/mysqld.sock -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost'
    IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

  conf=/etc/slurm
  mkdir -p "$conf" "$state/set-aside"
  for f in slurm.conf slurmdbd.conf; do
    [ -e "$conf/$f" ] && mv "$conf/$f" "$state/set-aside/$f"
  done
  cat > "$conf/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$state/slurmdbd.pid
LogFile=$state/slurmdbd.log
EOF
  chmod 600 "$conf/slurmdbd.conf"
  cat > "$conf/slurm.conf" <<EOF
ClusterName=fusedqk
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
AccountingStoreFlags=job_comment
MpiDefault=none
ReturnToService=2
MinJobAge=300
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mkdir -p "$state/ctld" "$state/slurmd"

  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  echo "slurmdbd $(cat "$state/slurmdbd.pid")" >> "$state/pids"
  sacctmgr -i add cluster fusedqk >/dev/null
  slurmctld
  wait_for 30 slurmctld scontrol ping
  echo "slurmctld $(cat "$state/slurmctld.pid")" >> "$state/pids"
  slurmd
  wait_for 30 slurmd test -s "$state/slurmd.pid"
  echo "slurmd $(cat "$state/slurmd.pid")" >> "$state/pids"
  wait_for 60 "the node" sh -c "sinfo -h -N -o %T | grep -qx idle"
  echo "$conf/slurm.conf"
  ;;
stop)
  state="${2:?STATE}"
  [ -f "$state/pids" ] || exit 0
  # The reverse order of starting; each by the PID it wrote.
  tac "$state/pids" | while read -r name pid; do
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null && echo "cluster.sh: $name ($pid) killed" >&2 || true
  done
  rm -f "$state/pids" /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf
  for f in "$state"/set-aside/*; do
    if [ -e "$f" ]; then mv "$f" /etc/slurm/; fi
  done
  ;;
*) echo "cluster.sh: unknown command $cmd" >&2; exit 2 ;;
esac
